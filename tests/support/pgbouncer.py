"""Debian's PgBouncer (1.18: no prepared statements in transaction mode), started by the tests on a free port with
an ini and an auth file of their own, in front of the test PostgreSQL."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from broker.postgres.embedded import free_port
from tests.support.processes import terminate

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def available() -> bool:
    return Path(PGBOUNCER).exists()


class PgBouncer:
    def __init__(self, server_url: str, database: str, users: list[str], pool_mode: str = "transaction") -> None:
        parts = urlsplit(server_url)
        self.dir = Path(tempfile.mkdtemp(prefix="tb-pgbouncer-"))
        self.port = free_port()
        (self.dir / "users.txt").write_text("".join(f'"{u}" ""\n' for u in users))
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"{database} = host={parts.hostname} port={parts.port or 5432} dbname={database}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\n"
            f"unix_socket_dir =\nauth_type = trust\nauth_file = {self.dir / 'users.txt'}\n"
            f"pool_mode = {pool_mode}\ndefault_pool_size = 8\nmax_client_conn = 500\n"
            f"logfile = {self.dir / 'pgbouncer.log'}\npidfile = {self.dir / 'pgbouncer.pid'}\n"
            "ignore_startup_parameters = extra_float_digits\n"
        )
        user = ["-u", "postgres"] if _is_root() else []
        if user:
            shutil.chown(self.dir, "postgres")
            for f in self.dir.iterdir():
                shutil.chown(f, "postgres")
        self.proc = subprocess.Popen(
            [PGBOUNCER, *user, str(self.dir / "pgbouncer.ini")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise RuntimeError(f"pgbouncer did not start: {err[-500:]}") from None
                time.sleep(0.05)

    def url(self, url: str) -> str:
        """`url` (a DSN of the test server) pointed at this PgBouncer instead."""
        parts = urlsplit(url)
        user = parts.netloc.rsplit("@", 1)[0]
        return urlunsplit((parts.scheme, f"{user}@127.0.0.1:{self.port}", parts.path, parts.query, parts.fragment))

    def stop(self) -> None:
        terminate(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def _is_root() -> bool:
    import os

    return os.geteuid() == 0
