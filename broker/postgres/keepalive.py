"""Socket options on every database connection, so that a dead peer is found by the kernel, not by a hung query."""

from __future__ import annotations

import socket

import asyncpg

#: Dead connections are found by the kernel, not by a query that hangs: keepalive probes after 10 s idle (every 5 s,
#: 3 misses), and TCP_USER_TIMEOUT drops a connection whose sent data stays unacknowledged for 15 s.
KEEPALIVE = {"TCP_KEEPIDLE": 10, "TCP_KEEPINTVL": 5, "TCP_KEEPCNT": 3}
USER_TIMEOUT_MS = 15_000


async def watch_socket(conn: asyncpg.Connection) -> None:
    """Pool init hook: TCP keepalive and TCP_USER_TIMEOUT on the connection's socket (a Unix socket has none)."""
    transport = getattr(conn, "_transport", None)  # asyncpg exposes no public accessor for its socket
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in KEEPALIVE.items():
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
