"""The base distribution (`pip install token-broker`, no `server` extra): `get` and `health` work against a running
broker, and `serve` (or `migrate`) says in one line which extra to install, exit 2, instead of a traceback.

The server-only modules are made unimportable for the CLI's process by a `sitecustomize` on PYTHONPATH (a venv
without them would need the dependencies' wheels, which an offline machine does not have)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.support.broker import ROOT, BrokerProcess, broker_env
from tests.support.pg import Database

#: The top-level modules of the `server` extra's distributions (pyproject.toml).
SERVER_ONLY = ("asyncpg", "authlib", "httpx2", "prometheus_client", "cryptography", "grpc_reflection", "uvloop")

_BLOCKER = f"""
import sys
from importlib.abc import MetaPathFinder

class ServerExtraNotInstalled(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {SERVER_ONLY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, ServerExtraNotInstalled())
"""


@pytest.fixture
def base_install(tmp_path: Path) -> dict[str, str]:
    """The environment of a process that sees only the base distribution's dependencies."""
    site = tmp_path / "base-install"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOCKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    return env


def token_broker(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The console script, as `pip install token-broker` installs it."""
    script = Path(sys.executable).with_name("token-broker")
    return subprocess.run([str(script), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_the_blocker_blocks(base_install: dict[str, str]) -> None:
    code = "import asyncpg"
    r = subprocess.run([sys.executable, "-c", code], env=base_install, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "ModuleNotFoundError: No module named 'asyncpg'" in r.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_the_server_commands_name_the_extra_to_install(
    base_install: dict[str, str], command: str, workers: str
) -> None:
    env = {**base_install, "BROKER_DATABASE_URL": "postgresql://u@127.0.0.1:1/d", "BROKER_WORKERS": workers}
    r = token_broker(command, env=env)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1  # one line
    assert f"token-broker: `{command}` needs the server extra" in r.stderr
    assert "pip install 'token-broker[server]'" in r.stderr


async def test_get_and_health_work_in_the_base_install(
    db: Database, base_install: dict[str, str], tmp_path: Path
) -> None:
    uid = uuid.uuid4()
    await db.insert_link(uid, "tok", "ref", datetime.now(UTC) + timedelta(hours=1))
    b = BrokerProcess(broker_env(db), tmp_path / "b.log")  # the server, with its extra
    try:
        r = token_broker("get", str(uid), "--target", b.target, env=base_install)
        assert r.returncode == 0, r.stderr
        assert "status: VALID" in r.stdout
        r = token_broker("health", "--target", b.target, env=base_install)
        assert (r.returncode, r.stdout.strip()) == (0, "SERVING")
    finally:
        assert b.stop() == 0
