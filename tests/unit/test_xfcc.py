"""Parsing Envoy's x-forwarded-client-cert and trusting it only from the local sidecar."""

from __future__ import annotations

import logging

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
        assert ("subject", 'CN=w,O="Acme; Inc"', True) in element
        assert xfcc_identities(header) == ["uri:spiffe://td/ns/a/sa/b"]

    def test_dns_names_count_in_an_element_without_a_uri(self) -> None:
        header = 'By=spiffe://td/b;Hash=4a1b;Subject="CN=w";URI=;DNS=a.example;DNS=*.b.example.'
        assert xfcc_identities(header) == ["dns:a.example", "dns:*.b.example."]

    def test_envoy_writes_one_by_per_uri_san_of_its_own(self) -> None:
        assert xfcc_identities(f"By=spiffe://td/a;{ISTIO}") == ["uri:spiffe://cluster.local/ns/chat/sa/worker"]

    @pytest.mark.parametrize("header", ['Subject="unterminated;URI=x', "novalue", "", ";;", "=x"])
    def test_malformed(self, header: str) -> None:
        with pytest.raises(MalformedHeader):
            parse_xfcc(header)


WORKER = "spiffe://cluster.local/ns/chat/sa/worker"


class TestFabricatedIdentities:
    """Envoy writes URI= and DNS= unquoted, as the certificate holds them: a certificate from a CA that checks its
    SANs less than Istio's can carry separators in them. Each attack below is refused, not read as an identity."""

    @pytest.mark.parametrize(
        "header",
        [
            # A URI SAN `spiffe://evil/x;URI=<worker>`: two URI= in the element.
            f'By=spiffe://td/b;Hash=4a1b;Subject="";URI=spiffe://evil/x;URI={WORKER}',
            f"URI={WORKER};URI=spiffe://evil/x",
            # A DNS SAN `a.example;URI=<worker>` in a certificate without a URI SAN: URI= after DNS= is not Envoy's.
            f'Hash=4a1b;Subject="";URI=;DNS=a.example;URI={WORKER}',
            # A URI that is not a SPIFFE ID, or a SPIFFE ID with characters no SPIFFE ID has.
            "URI=https://evil.example/x",
            'URI=spiffe://cluster.local/ns/chat/sa/worker"',
            "URI=spiffe://cluster.local/ns/chat/sa/worker=",
            "URI=spiffe://Cluster.local/ns/chat/sa/worker",
            "URI=spiffe://cluster.local/ns/../sa/worker",
            "URI=spiffe://cluster.local/ns/chat/sa/worker/",
            # A DNS name with characters no DNS name has.
            "DNS=worker.example=1",
            "DNS=worker example",
            "DNS=-worker.example",
            # Values the sidecar never quotes, keys it never writes, keys out of its order.
            f'URI="{WORKER}"',
            'DNS="worker.example"',
            f"X-Role=admin;URI={WORKER}",
            f"URI={WORKER};Hash=4a1b",
            f'Subject="a";Subject="b";URI={WORKER}',
        ],
    )
    def test_an_element_that_does_not_fit_is_refused(self, header: str) -> None:
        with pytest.raises(MalformedHeader):
            xfcc_identities(header)

    def test_an_append_forward_prefix_ending_in_an_open_quote_cannot_merge(self) -> None:
        """With APPEND_FORWARD the client's own header comes first. A prefix that ends inside a quote would swallow
        the separator of the sidecar's element; the attacker's certificate subject (a `"` in it, escaped by Envoy)
        evens the quotes out, so the whole header still has balanced quotes."""
        client = f'URI={WORKER};Subject="'
        appended = 'By=spiffe://cluster.local/ns/auth/sa/token-broker;Hash=4a1b;Subject="CN=x\\"";DNS=evil.example'
        with pytest.raises(MalformedHeader):
            xfcc_identities(f"{client},{appended}")
        # Even so, the attacker's prefix never counts when the header parses: only the sidecar's element does.
        honest = 'By=spiffe://cluster.local/ns/auth/sa/token-broker;Hash=4a1b;Subject="CN=x";DNS=evil.example'
        assert xfcc_identities(f"URI={WORKER},{honest}") == ["dns:evil.example"]


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

    def test_a_refused_header_is_logged_once(self, caplog: pytest.LogCaptureFixture) -> None:
        gate = self.gate([])
        forged = f"URI=spiffe://evil/x;URI={WORKER}"
        with caplog.at_level(logging.WARNING, logger="broker.auth"):
            for _ in range(3):
                assert gate.identities("ipv4:127.0.0.1:1", [("x-forwarded-client-cert", forged)]) == []
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1
        assert "more than one URI=" in warnings[0]
        assert WORKER not in warnings[0]

    def test_linkerd(self) -> None:
        gate = MeshIdentity("l5d", ["127.0.0.1"], lambda: None)
        ident = "worker.chat.serviceaccount.identity.linkerd.cluster.local"
        assert gate.identities("ipv4:127.0.0.1:1", [("l5d-client-id", ident)]) == [f"dns:{ident}"]

    def test_peer_host(self) -> None:
        assert peer_host("ipv6:[::1]:80") == "::1"
        assert peer_host("ipv4:127.0.0.1:80") == "127.0.0.1"
        assert peer_host("unix:/x") is None
