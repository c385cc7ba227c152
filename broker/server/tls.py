"""TLS for the gRPC port: server credentials whose certificate files are re-read when they change (cert-manager
rotates them in place), optionally requiring client certificates (mutual TLS)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger("broker.tls")


@dataclass(frozen=True)
class _Stamp:
    files: tuple[tuple[int, int], ...]  # (mtime_ns, size) per file


class ReloadingCertificates:
    """Builds grpc server credentials; gRPC asks `fetch()` at each handshake and gets a new config after a change."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self._cert, self._key, self._ca = cert_file, key_file, client_ca_file
        self._lock = threading.Lock()
        self._stamp = self._current_stamp()
        self.reloads = 0

    def _paths(self) -> list[Path]:
        return [p for p in (self._cert, self._key, self._ca) if p is not None]

    def _current_stamp(self) -> _Stamp:
        stats = [p.stat() for p in self._paths()]
        return _Stamp(tuple((s.st_mtime_ns, s.st_size) for s in stats))

    def _config(self) -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(self._key.read_bytes(), self._cert.read_bytes())],
            root_certificates=self._ca.read_bytes() if self._ca else None,
        )

    def fetch(self) -> Any:
        """None keeps the current certificates; a configuration replaces them for new connections."""
        try:
            stamp = self._current_stamp()
            with self._lock:
                if stamp == self._stamp:
                    return None
                config = self._config()
                self._stamp = stamp
                self.reloads += 1
            log.info("TLS certificate files changed; reloaded")
            return config
        except (OSError, ValueError) as exc:  # half-written files during rotation: keep serving the old ones
            log.warning("TLS certificate reload failed, keeping the current certificate: %s", exc)
            return None

    def server_credentials(self) -> Any:
        return grpc.dynamic_ssl_server_credentials(
            self._config(), self.fetch, require_client_authentication=self._ca is not None
        )
