"""The Go caller (#15): the Go client's tests against a real broker, and the Go chat-worker example against a local
upstream that checks the Authorization header."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shlex
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.support.broker import BrokerProcess, broker_env, running_broker
from tests.support.golang import ROOT, client_dir, run_go
from tests.support.idp import OidcTestProvider
from tests.support.pg import Database


async def test_the_go_client_against_the_broker(db: Database, idp: OidcTestProvider) -> None:
    valid, expired, nolink = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await db.insert_link(valid, "go-valid-token", "r", datetime.now(UTC) + timedelta(hours=1))
    issued = await idp.login(f"user-{expired}")
    await db.insert_link(expired, issued.access_token, issued.refresh_token, datetime.now(UTC) - timedelta(minutes=1))
    await db.insert_link(nolink, "", "", None, login_type="password")
    async with running_broker(broker_env(db, idp)) as b:
        env = {
            "TB_TARGET": b.target,
            "TB_VALID_USER": str(valid),
            "TB_VALID_TOKEN": "go-valid-token",
            "TB_EXPIRED_USER": str(expired),
            "TB_EXPIRED_TOKEN": issued.access_token,
            "TB_NOLINK_USER": str(nolink),
        }
        # TestAudienceBound runs in tests/integration/test_exchange.py, against a broker with a resource policy.
        out = await asyncio.to_thread(
            run_go, "test", "-count=1", "-v", "-skip", "TestAudienceBound", "./...", cwd=client_dir(), env=env
        )
    assert "--- PASS: TestAgainstTheBroker" in out
    assert "--- PASS: TestUnavailableIsRetried" in out
    assert "--- PASS: TestEveryCallHasADeadline" in out
    assert "SKIP" not in out


@contextmanager
def upstream(token: str) -> Iterator[tuple[str, list[str | None]]]:
    """A local upstream MCP endpoint: 200 to `Authorization: Bearer <token>`, else 401; (its URL, the headers seen)."""
    seen: list[str | None] = []

    class Upstream(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            seen.append(self.headers.get("authorization"))
            self.send_response(200 if self.headers.get("authorization") == f"Bearer {token}" else 401)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/mcp", seen
    finally:
        server.shutdown()
        server.server_close()


async def test_the_go_chat_worker_sends_the_header_only_with_a_token(db: Database) -> None:
    oidc, password = uuid.uuid4(), uuid.uuid4()
    await db.insert_link(oidc, "go-worker-token", "r", datetime.now(UTC) + timedelta(hours=1))
    await db.insert_link(password, "", "", None, login_type="password")
    with upstream("go-worker-token") as (url, seen):
        async with running_broker(broker_env(db)) as b:

            def worker(user: uuid.UUID) -> str:
                args = ("run", "./examples/go/chatworker", "-broker", b.target, "-upstream", url, str(user))
                return run_go(*args, cwd=ROOT).strip()

            with_token = await asyncio.to_thread(worker, oidc)
            without = await asyncio.to_thread(worker, password)
    assert (with_token, without) == ("200", "401")
    assert seen == ["Bearer go-worker-token", None]


def documented_go_example() -> list[str]:
    """The documented one command for the Go example (docs/clients.md, the Go client section), as words."""
    lines = [line.strip() for line in (ROOT / "docs" / "clients.md").read_text().splitlines()]
    commands = [line for line in lines if line.startswith("make go-example ")]
    assert len(commands) == 1, commands
    return shlex.split(commands[0].split("#")[0])


async def test_the_documented_make_go_example_builds_and_runs_the_worker(db: Database) -> None:
    """The documented command, word for word, with this test's broker, upstream and user in its variables."""
    uid = uuid.uuid4()
    await db.insert_link(uid, "go-example-token", "r", datetime.now(UTC) + timedelta(hours=1))
    command = documented_go_example()
    names = [word.split("=")[0] for word in command[2:]]
    assert sorted(names) == ["BROKER", "UPSTREAM", "USER_ID"]
    with upstream("go-example-token") as (url, seen):
        async with running_broker(broker_env(db)) as b:
            values = {"UPSTREAM": url, "USER_ID": str(uid), "BROKER": b.target}
            argv = command[:2] + [f"{name}={values[name]}" for name in names]
            # As typed in a shell: not as a sub-make of `make test` (which would add "Entering directory" lines).
            shell = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
            out = await asyncio.to_thread(
                subprocess.run, argv, cwd=ROOT, env=shell, capture_output=True, text=True, timeout=600, check=False
            )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1] == "200"
    assert seen == ["Bearer go-example-token"]
    assert not (ROOT / "clients" / "clients").exists()  # the GOPATH link, made once, never nested into clients/


async def test_the_go_stream_helper_resumes_across_a_broker_restart(db: Database, tmp_path: Path) -> None:
    callers = tmp_path / "callers"
    callers.write_text(f"watcher:{hashlib.sha256(b'go-watcher-token').hexdigest()}\n")
    env = broker_env(db, None, BROKER_CALLER_TOKENS_FILE=str(callers), BROKER_EVENT_WATCHERS="token:watcher")
    binary = tmp_path / "linkevents"
    await asyncio.to_thread(run_go, "build", "-o", str(binary), "./examples/go/linkevents", cwd=ROOT)
    uid = uuid.uuid4()
    await db.change_link_state(uid)
    first = BrokerProcess(env, tmp_path / "a.log")
    second: BrokerProcess | None = None
    watcher = subprocess.Popen(
        [str(binary), "-broker", first.target, "-token", "go-watcher-token", "-after", "0", "-count", "5"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None
        lines = [await asyncio.to_thread(watcher.stdout.readline)]
        first.stop()  # SIGTERM: the stream ends UNAVAILABLE and the helper reconnects
        await db.change_link_state(uid)
        await db.change_link_state(uid)  # 4 more events while no broker runs
        second = BrokerProcess(env, tmp_path / "b.log", port=first.port)
        out, _ = await asyncio.to_thread(watcher.communicate, timeout=60)
        lines += out.splitlines()
    finally:
        if watcher.poll() is None:
            watcher.kill()
        first.stop()
        if second is not None:
            second.stop()
    assert watcher.returncode == 0
    conn = await db.admin()
    try:
        ids = [str(r["id"]) for r in await conn.fetch("SELECT id FROM token_broker.link_events ORDER BY id")]
    finally:
        await conn.close()
    assert [json.loads(line)["id"] for line in lines] == ids
