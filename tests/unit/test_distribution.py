"""A chat worker installs the client without the server: the base distribution and what the client imports."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata

SERVER_ONLY = ("asyncpg", "authlib", "httpx2", "prometheus_client", "cryptography")


def test_the_base_distribution_requires_no_server_library() -> None:
    requires = metadata.requires("token-broker") or []
    base = {re.split(r"[<>=;\[ ]", r)[0].lower() for r in requires if "extra ==" not in r}
    assert base == {"grpcio", "grpcio-health-checking", "protobuf"}
    server = {re.split(r"[<>=;\[ ]", r)[0].lower() for r in requires if 'extra == "server"' in r}
    assert {"asyncpg", "authlib", "httpx2", "prometheus-client", "cryptography"} <= server


def test_the_clients_import_no_server_library() -> None:
    code = f"import sys, broker.client, broker.cli; print(','.join(m for m in {SERVER_ONLY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == ""


def test_a_dns_target_balances_over_every_address() -> None:
    import json

    from broker.client import service_config

    assert json.loads(service_config("dns:///token-broker-headless.auth.svc:50051"))["loadBalancingConfig"] == [
        {"round_robin": {}}
    ]
    assert "loadBalancingConfig" not in json.loads(service_config("token-broker:50051"))
