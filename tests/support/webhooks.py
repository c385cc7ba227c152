"""A real HTTP webhook receiver for the tests: verifies every delivery with the Standard Webhooks reference library
(`standardwebhooks`), records what it got, and can be down (connection refused), failing (503), gone (410) or
hanging, on cue."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook

from broker.postgres.embedded import free_port


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


@dataclass
class Delivery:
    msg_id: str
    timestamp: int
    body: dict[str, Any]
    raw: bytes
    headers: dict[str, str]
    received: float  # time.time() when it arrived


@dataclass
class Receiver:
    """POST / on 127.0.0.1:`port`. `mode`: ok (204), fail (503), gone (410), hang (no answer until `release`)."""

    secret: str = field(default_factory=new_secret)
    port: int = field(default_factory=free_port)
    mode: str = "ok"
    deliveries: list[Delivery] = field(default_factory=list)  # verified and answered 2xx
    attempts: int = 0
    rejected_signatures: int = 0
    max_concurrent_per_user: int = 0
    _in_flight: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _release: threading.Event = field(default_factory=threading.Event)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/token-broker"

    def start(self) -> Receiver:
        receiver = self
        webhook = Webhook(self.secret)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    body = webhook.verify(raw, headers)
                except Exception:
                    with receiver._lock:
                        receiver.rejected_signatures += 1
                    self.send_response(400)
                    self.end_headers()
                    return
                user = body["data"]["user_id"]
                with receiver._lock:
                    receiver.attempts += 1
                    receiver._in_flight[user] += 1
                    receiver.max_concurrent_per_user = max(receiver.max_concurrent_per_user, receiver._in_flight[user])
                    mode = receiver.mode
                try:
                    if mode == "hang":
                        receiver._release.wait(30)
                        self.close_connection = True
                        return
                    status = {"ok": 204, "fail": 503, "gone": 410}[mode]
                    if status == 204:
                        with receiver._lock:
                            receiver.deliveries.append(
                                Delivery(
                                    headers["webhook-id"],
                                    int(headers["webhook-timestamp"]),
                                    body,
                                    raw,
                                    headers,
                                    time.time(),
                                )
                            )
                    self.send_response(status)
                    self.end_headers()
                finally:
                    with receiver._lock:
                        receiver._in_flight[user] -= 1

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Down: the port refuses connections."""
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def release(self) -> None:
        self._release.set()

    def received(self) -> list[Delivery]:
        with self._lock:
            return list(self.deliveries)

    def events(self) -> list[dict[str, Any]]:
        """The `data` of each delivery, one per webhook-id (duplicates of an id dropped, as a receiver would)."""
        seen: set[str] = set()
        out = []
        for d in self.received():
            if d.msg_id not in seen:
                seen.add(d.msg_id)
                out.append(d.body["data"])
        return out

    def wait_for(self, count: int, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.events()
            if len(got) >= count:
                return got
            time.sleep(0.05)
        raise AssertionError(f"receiver got {len(self.events())} distinct events, expected {count}: {self.events()}")


def dumps(events: list[dict[str, Any]]) -> str:
    return json.dumps(events, indent=1)
