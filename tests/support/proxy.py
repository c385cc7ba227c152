"""A TCP proxy of the tests' own between the broker and PostgreSQL, to inject network faults on cue:

- `cut()`: close every connection at once (RST-like for the broker) and refuse new ones until `heal()`;
- `refuse_new()`: refuse new connections only, until `heal()`;
- `silence()`: keep connections open but forward nothing, in either direction (a partition without RST: packets
  dropped), and accept new connections that never answer, until `heal()`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

from tests.support.pg import Database


class FaultyProxy:
    def __init__(self, target_host: str, target_port: int, *, source_host: str | None = None) -> None:
        self._target = (target_host, target_port)
        self._source = (source_host, 0) if source_host else None  # the address the target sees connections from
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._open = asyncio.Event()
        self._open.set()
        self._refusing = False
        self.port = 0

    async def start(self) -> FaultyProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self._drop_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        self._refusing = True
        self._drop_all()

    def refuse_new(self) -> None:
        """Refuse new connections (reset at once) and keep the open ones: the database unreachable to a process
        that connects now, while those already connected keep their pool."""
        self._refusing = True

    def silence(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._refusing = False
        self._open.set()

    def _drop_all(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target, local_addr=self._source)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                await self._open.wait()  # silent: hold the bytes back, as a dropped-packet path would
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


def through(url: str, port: int) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)
    netloc = f"{host[0]}@127.0.0.1:{port}" if len(host) == 2 else f"127.0.0.1:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@asynccontextmanager
async def proxied(db: Database) -> AsyncIterator[tuple[FaultyProxy, str]]:
    parts = urlsplit(db.service_url)
    proxy = await FaultyProxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
    try:
        yield proxy, through(db.service_url, proxy.port)
    finally:
        await proxy.close()
