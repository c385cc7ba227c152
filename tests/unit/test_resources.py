"""The resource policy and RFC 8707 resource URIs: normalisation, what is refused, one message naming every error."""

from __future__ import annotations

import pytest

from broker.core.resources import ResourceEntry, ResourcePolicy, normalise_resource, parse_policy
from broker.errors import ConfigError


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("https://MCP.Example.com/mcp", "https://mcp.example.com/mcp"),
        ("HTTPS://mcp.example.com:443/mcp", "https://mcp.example.com/mcp"),
        ("https://mcp.example.com:8443/Mcp?tenant=A", "https://mcp.example.com:8443/Mcp?tenant=A"),
        ("http://127.0.0.1:80/x", "http://127.0.0.1/x"),
        ("http://localhost:9000/x", "http://localhost:9000/x"),
        ("https://[::1]:443/mcp", "https://[::1]/mcp"),
        ("https://mcp.example.com", "https://mcp.example.com"),
    ],
)
def test_resources_are_normalised(given: str, canonical: str) -> None:
    assert normalise_resource(given) == canonical


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "mcp.example.com/mcp",
        "/mcp",
        "https://mcp.example.com/mcp#part",
        "https://user:pw@mcp.example.com/mcp",
        "https://user@mcp.example.com/mcp",
        "http://mcp.example.com/mcp",
        "ftp://mcp.example.com/",
        "https://mcp.example.com:99999/",
        "https://mcp.example.com/a b",
        "https://mcp.exämple.com/",
    ],
)
def test_bad_resources_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match=r"\w"):
        normalise_resource(bad)


def test_a_caller_matches_by_any_of_its_identities_and_an_unknown_resource_like_an_unlisted_caller() -> None:
    policy = ResourcePolicy([ResourceEntry("https://MCP.example.com/mcp", callers=frozenset({"token:chat"}))])
    canonical = normalise_resource("https://mcp.example.com:443/mcp")
    assert policy.match(canonical, ["dns:worker", "token:chat"]) is not None
    assert policy.match(canonical, ["token:other"]) is None
    assert policy.match(canonical, []) is None  # a caller with no identity matches nothing
    assert policy.match("https://unknown.example.com/mcp", ["token:chat"]) is None
    entry = policy.match(canonical, ["token:chat"])
    assert entry is not None
    assert entry.resource == "https://MCP.example.com/mcp"  # sent to the IdP as the policy names it


def test_a_document_is_a_list_or_a_mapping_with_resources() -> None:
    doc = [{"resource": "https://a.example/mcp", "audience": "a", "scope": "tools", "callers": ["spiffe://c/w"]}]
    for document in (doc, {"resources": doc}):
        (entry,) = parse_policy(document).entries()
        assert (entry.resource, entry.audience, entry.scope) == ("https://a.example/mcp", "a", "tools")
        assert entry.callers == frozenset({"uri:spiffe://c/w"})


def test_every_error_is_named_in_one_message() -> None:
    document = [
        {"resource": "http://mcp.example.com/x", "callers": ["token:chat"]},
        {"resource": "https://b.example/mcp", "callers": []},
        {"resource": "https://c.example/mcp", "callers": ["worker"], "colour": "blue"},
        {"resource": "https://B.example:443/mcp", "callers": ["token:chat"]},
        {"callers": ["token:chat"]},
        "not a mapping",
        {"resource": "https://d.example/mcp", "callers": ["token:nobody"]},
    ]
    with pytest.raises(ConfigError) as err:
        parse_policy(document, allowed_callers=frozenset({"token:chat"}))
    text = str(err.value)
    for expected in (
        "entry 1: resource 'http://mcp.example.com/x' must be https",
        "entry 2: callers must be a non-empty list",
        "entry 3: unknown field(s) colour",
        "entry 3: caller 'worker' has no kind",
        "entry 4: resource 'https://B.example:443/mcp' is listed already in entry 2",
        "entry 5: resource is required",
        "entry 6: must be a mapping",
        "entry 7: caller token:nobody is not admitted by BROKER_ALLOWED_CALLERS",
    ):
        assert expected in text


@pytest.mark.parametrize(
    ("resource", "url"),
    [
        ("https://mcp.example.com/mcp", "https://mcp.example.com/.well-known/oauth-protected-resource/mcp"),
        ("https://mcp.example.com", "https://mcp.example.com/.well-known/oauth-protected-resource"),
        ("https://mcp.example.com/", "https://mcp.example.com/.well-known/oauth-protected-resource"),
        (
            "https://mcp.example.com:8443/a/b?x=1",
            "https://mcp.example.com:8443/.well-known/oauth-protected-resource/a/b",
        ),
    ],
)
def test_the_rfc_9728_metadata_url(resource: str, url: str) -> None:
    from broker.protected_resource import metadata_url

    assert metadata_url(resource) == url
