"""Parsing Envoy's x-forwarded-client-cert and trusting it only from the local sidecar."""

from __future__ import annotations

import pytest

from broker.server.mesh import MalformedHeader, MeshIdentity, parse_xfcc, peer_host, xfcc_identities

ISTIO = (
    'By=spiffe://cluster.local/ns/auth/sa/token-broker;Hash=4a1b;Subject="";'
    "URI=spiffe://cluster.local/ns/chat/sa/worker"
)


class TestXfcc:
    def test_istio_header(self) -> None:
        assert xfcc_identities(ISTIO) == ["uri:spiffe://cluster.local/ns/chat/sa/worker"]

    def test_the_last_element_is_the_local_sidecars(self) -> None:
        header = f"By=a;URI=spiffe://evil/forged,{ISTIO}"
        assert xfcc_identities(header) == ["uri:spiffe://cluster.local/ns/chat/sa/worker"]

    def test_quoted_values_with_separators_and_escapes(self) -> None:
        header = 'Subject="CN=w,O=\\"Acme; Inc\\"";URI=spiffe://td/ns/a/sa/b;DNS=a.example;DNS=b.example'
        (element,) = parse_xfcc(header)
        assert ("subject", 'CN=w,O="Acme; Inc"') in element
        assert xfcc_identities(header) == ["uri:spiffe://td/ns/a/sa/b", "dns:a.example", "dns:b.example"]

    @pytest.mark.parametrize("header", ['Subject="unterminated;URI=x', "novalue", "", ";;", "=x"])
    def test_malformed(self, header: str) -> None:
        with pytest.raises(MalformedHeader):
            parse_xfcc(header)


class TestTrust:
    def gate(self, seen: list[int]) -> MeshIdentity:
        return MeshIdentity("xfcc", ["127.0.0.1", "::1", "127.0.0.6"], lambda: seen.append(1))

    @pytest.mark.parametrize("peer", ["ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "ipv4:127.0.0.6:41000"])
    def test_the_sidecars_addresses_are_trusted(self, peer: str) -> None:
        seen: list[int] = []
        assert self.gate(seen).identities(peer, [("x-forwarded-client-cert", ISTIO)]) != []
        assert seen == []

    @pytest.mark.parametrize("peer", ["ipv4:127.0.0.2:5000", "ipv4:10.0.0.7:5000", "unix:/tmp/s"])
    def test_any_other_peer_is_ignored_and_counted(self, peer: str) -> None:
        seen: list[int] = []
        assert self.gate(seen).identities(peer, [("x-forwarded-client-cert", ISTIO)]) == []
        assert seen == [1]

    def test_linkerd(self) -> None:
        gate = MeshIdentity("l5d", ["127.0.0.1"], lambda: None)
        ident = "worker.chat.serviceaccount.identity.linkerd.cluster.local"
        assert gate.identities("ipv4:127.0.0.1:1", [("l5d-client-id", ident)]) == [f"dns:{ident}"]

    def test_peer_host(self) -> None:
        assert peer_host("ipv6:[::1]:80") == "::1"
        assert peer_host("ipv4:127.0.0.1:80") == "127.0.0.1"
        assert peer_host("unix:/x") is None
