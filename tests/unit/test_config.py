"""Settings.from_env: defaults, secrets from files, and one message naming every bad variable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker.config import DB_POOL_SMALLEST, Settings, pool_shares
from broker.errors import ConfigError

BASE = {"BROKER_DATABASE_URL": "postgresql://svc:pw@db/app"}


def test_defaults() -> None:
    s = Settings.from_env(BASE)
    assert s.listen == "127.0.0.1:50051"
    assert s.metrics_listen == "127.0.0.1:9464"
    assert s.refresh_leeway == 600
    assert s.oidc_timeout == 5
    assert s.reauth_backoff == 60
    assert s.db_service_role == "token_broker"
    assert s.oidc_auth_method == "client_secret_basic"
    assert not s.idp_configured
    assert s.migrate_database_url == s.database_url


def test_every_bad_variable_is_named_at_once() -> None:
    env = {
        **BASE,
        "BROKER_REFRESH_LEEWAY": "ten",
        "BROKER_OIDC_TIMEOUT": "-1",
        "BROKER_LISTEN": "nope",
        "BROKER_LOG_LEVEL": "LOUD",
        "BROKER_DB_POOL_MAX": "2",  # a read, a refresh and its in-flight marker need three
        "BROKER_OIDC_ISSUER": "http://idp.example.com",
        "BROKER_ALLOW_INSECURE": "maybe",
    }
    with pytest.raises(ConfigError) as err:
        Settings.from_env(env)
    msg = str(err.value)
    for name in (
        "BROKER_REFRESH_LEEWAY",
        "BROKER_OIDC_TIMEOUT",
        "BROKER_LISTEN",
        "BROKER_LOG_LEVEL",
        "BROKER_DB_POOL_MAX",
        "BROKER_OIDC_ISSUER",
        "BROKER_OIDC_CLIENT_ID",
        "BROKER_ALLOW_INSECURE",
    ):
        assert name in msg


def test_secrets_never_appear_in_errors_or_repr() -> None:
    env = {**BASE, "BROKER_DATABASE_URL": "mysql://u:hunter2@db/x", "BROKER_OIDC_CLIENT_SECRET": "s3cr3t-value"}
    with pytest.raises(ConfigError) as err:
        Settings.from_env(env)
    assert "hunter2" not in str(err.value)
    assert "s3cr3t-value" not in str(err.value)
    s = Settings.from_env(
        {
            **BASE,
            "BROKER_OIDC_CLIENT_SECRET": "s3cr3t-value",
            "BROKER_OIDC_CLIENT_ID": "c",
            "BROKER_OIDC_TOKEN_URL": "https://idp.example.com/token",
        }
    )
    assert "s3cr3t-value" not in repr(s)
    assert "pw@" not in repr(s)


def test_secrets_from_files(tmp_path: Path) -> None:
    (tmp_path / "dsn").write_text("postgresql://svc:pw@db/app\n")
    (tmp_path / "secret").write_text("from-file\n")
    s = Settings.from_env(
        {
            "BROKER_DATABASE_URL_FILE": str(tmp_path / "dsn"),
            "BROKER_OIDC_CLIENT_SECRET_FILE": str(tmp_path / "secret"),
            "BROKER_OIDC_CLIENT_ID": "c",
            "BROKER_OIDC_ISSUER": "https://idp.example.com",
        }
    )
    assert s.database_url is not None
    assert s.database_url.reveal() == "postgresql://svc:pw@db/app"
    assert s.oidc_client_secret is not None
    assert s.oidc_client_secret.reveal() == "from-file"
    assert s.idp_configured


def test_missing_secret_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="BROKER_OIDC_CLIENT_SECRET_FILE"):
        Settings.from_env(
            {
                **BASE,
                "BROKER_OIDC_CLIENT_SECRET_FILE": str(tmp_path / "missing"),
                "BROKER_OIDC_CLIENT_ID": "c",
                "BROKER_OIDC_ISSUER": "https://idp.example.com",
            }
        )


@pytest.mark.parametrize("issuer", ["http://127.0.0.1:8080", "http://localhost:9000", "http://[::1]:9000"])
def test_plain_http_issuer_is_allowed_on_loopback(issuer: str) -> None:
    s = Settings.from_env(
        {**BASE, "BROKER_OIDC_ISSUER": issuer, "BROKER_OIDC_CLIENT_ID": "c", "BROKER_OIDC_CLIENT_SECRET": "s"}
    )
    assert s.oidc_issuer == issuer


@pytest.mark.parametrize("issuer", ["http://10.0.0.5", "http://idp.internal", "ftp://127.0.0.1", "idp.example.com"])
def test_plain_http_issuer_is_refused_elsewhere(issuer: str) -> None:
    with pytest.raises(ConfigError, match="BROKER_OIDC_ISSUER"):
        Settings.from_env(
            {**BASE, "BROKER_OIDC_ISSUER": issuer, "BROKER_OIDC_CLIENT_ID": "c", "BROKER_OIDC_CLIENT_SECRET": "s"}
        )


def test_workers_follow_the_cgroup_cpu_quota(tmp_path: Path) -> None:
    import os

    from broker.config import cpu_limit

    cpus = len(os.sched_getaffinity(0))
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: 2 workers (rounded up), never above the affinity
    assert cpu_limit(v2) == min(2, cpus)
    (v2 / "cpu.max").write_text("max 100000\n")  # no quota: the affinity
    assert cpu_limit(v2) == cpus
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_limit(v1) == 1  # half a CPU: one worker
    assert cpu_limit(tmp_path / "none") == cpus


def test_workers_setting() -> None:
    base = {"BROKER_DATABASE_URL": "postgresql://u@127.0.0.1/db"}
    assert Settings.from_env({**base, "BROKER_WORKERS": "3"}).workers == 3
    assert 1 <= Settings.from_env(base).workers <= 8  # auto
    assert Settings.from_env({**base, "BROKER_EVENT_LOOP": "asyncio"}).event_loop == "asyncio"
    for bad in ({"BROKER_WORKERS": "0"}, {"BROKER_WORKERS": "many"}, {"BROKER_EVENT_LOOP": "trio"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            Settings.from_env({**base, **bad})


def test_a_pool_below_the_smallest_that_works_is_refused_naming_the_setting() -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({**BASE, "BROKER_DB_POOL_MAX": str(DB_POOL_SMALLEST - 1)})
    assert f"BROKER_DB_POOL_MAX: at least {DB_POOL_SMALLEST}, not {DB_POOL_SMALLEST - 1}" in str(err.value)
    assert Settings.from_env({**BASE, "BROKER_DB_POOL_MAX": str(DB_POOL_SMALLEST)}).db_pool_max == DB_POOL_SMALLEST


def test_every_pool_size_leaves_a_connection_beyond_the_reads_and_the_refreshes() -> None:
    """A refresh holding its row lock always gets one for its in-flight marker; the readiness check one too."""
    for size in range(DB_POOL_SMALLEST, 1001):
        reads, refreshes = pool_shares(size)
        assert reads >= 1
        assert 1 <= refreshes <= size // 2
        assert reads + refreshes + 1 <= size, size
    assert [pool_shares(n) for n in (3, 4, 5, 6, 10)] == [(1, 1), (1, 2), (1, 2), (2, 3), (2, 5)]


def test_the_charts_schema_states_the_same_smallest_pool() -> None:
    schema = json.loads((Path(__file__).parents[2] / "helm/token-broker/values.schema.json").read_text())
    assert schema["properties"]["broker"]["properties"]["dbPoolMax"]["minimum"] == DB_POOL_SMALLEST


def test_passthrough_and_the_resources_file(tmp_path: Path) -> None:
    policy = tmp_path / "resources.yaml"
    policy.write_text("- resource: https://mcp.example.com/mcp\n  callers: [token:chat]\n")
    idp = {
        "BROKER_OIDC_ISSUER": "https://idp.example.com",
        "BROKER_OIDC_CLIENT_ID": "broker",
        "BROKER_OIDC_CLIENT_SECRET": "s",
    }
    s = Settings.from_env({**idp, "BROKER_RESOURCES_FILE": str(policy), "BROKER_PASSTHROUGH": "deny"})
    assert (s.resources_file, s.passthrough) == (policy, "deny")
    assert Settings.from_env({}).passthrough == "allow"
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"BROKER_RESOURCES_FILE": str(policy), "BROKER_PASSTHROUGH": "sometimes"})
    assert "BROKER_PASSTHROUGH: must be allow or deny" in str(err.value)
    assert "BROKER_RESOURCES_FILE: needs an identity provider" in str(err.value)


def test_the_resources_file_is_read_as_json_or_yaml_with_every_error_named(tmp_path: Path) -> None:
    from broker.server.resourcefile import load_policy

    json_file = tmp_path / "r.json"
    json_file.write_text('[{"resource": "https://a.example/mcp", "callers": ["token:chat"]}]')
    assert len(load_policy(json_file, frozenset())) == 1
    bad = tmp_path / "r.yaml"
    bad.write_text("resources:\n  - resource: http://a.example/mcp\n    callers: []\n")
    with pytest.raises(ConfigError) as err:
        load_policy(bad, frozenset())
    assert "entry 1: resource 'http://a.example/mcp' must be https" in str(err.value)
    assert "entry 1: callers must be a non-empty list" in str(err.value)
    broken = tmp_path / "broken.yaml"
    broken.write_text("resources: [\n")
    with pytest.raises(ConfigError, match="neither JSON nor YAML"):
        load_policy(broken, frozenset())
