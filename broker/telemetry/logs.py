"""Structured logs: one JSON object per line on stdout, with secrets scrubbed as a last line of defence."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TextIO

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Formats a record as JSON: ts, level, logger, msg, the record's `extra` fields, and any traceback.

    Values listed in `redact` (the client secret, the DSN password) are replaced wherever they appear.
    """

    def __init__(self, redact: Iterable[str] = (), *, trace_ids: bool = False) -> None:
        super().__init__()
        self._redact = [s for s in redact if s and len(s) >= 4]
        self._trace_ids = trace_ids

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return self.render(entry)

    def render(self, entry: dict[str, Any]) -> str:
        """One line of `entry` (plus the trace ids when on), secrets redacted."""
        if self._trace_ids:
            from broker.telemetry.tracing import log_ids

            entry.update(log_ids())
        line = json.dumps(entry, default=str, separators=(",", ":"))
        for secret in self._redact:
            if secret in line:
                line = line.replace(secret, "[REDACTED]")
        return line


_direct: tuple[logging.StreamHandler[TextIO], JsonFormatter] | None = None


def info_line(logger: logging.Logger, msg: str, fields: dict[str, Any]) -> None:
    """An INFO line with `fields`, as `logger.info(msg, extra=fields)` writes it. When the only handler is the one
    `configure` installed, it is one preformatted write (no LogRecord, no caller lookup: the per-request audit line
    is on the hot path); when anything else listens too (a test's log capture), it goes through logging."""
    if not logger.isEnabledFor(logging.INFO):
        return
    direct = _direct
    handlers = logging.root.handlers
    if direct is None or len(handlers) != 1 or handlers[0] is not direct[0] or logger.handlers:
        logger.info(msg, extra=fields)
        return
    handler, formatter = direct
    entry = {
        "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "level": "info",
        "logger": logger.name,
        "msg": msg,
        **fields,
    }
    line = formatter.render(entry) + "\n"
    with handler.lock:  # type: ignore[union-attr]  # created with the handler
        handler.stream.write(line)
        handler.stream.flush()


def configure(level: str, redact: Iterable[str] = (), stream: TextIO | None = None, *, trace_ids: bool = False) -> None:
    """Route every logger to one JSON handler on stdout at `level`; with `trace_ids`, lines written inside a span
    carry its trace_id and span_id."""
    global _direct
    handler = logging.StreamHandler(stream or sys.stdout)
    formatter = JsonFormatter(redact, trace_ids=trace_ids)
    handler.setFormatter(formatter)
    _direct = (handler, formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpx2", "httpcore", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


class UserLog(logging.LoggerAdapter):  # type: ignore[type-arg]  # LoggerAdapter is generic only in typeshed
    """A logger whose lines carry `user_id` (never a token): `UserLog(log, uid).warning("...")`."""

    def __init__(self, logger: logging.Logger, user_id: object) -> None:
        super().__init__(logger, {"user_id": str(user_id)})

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(kwargs.get("extra") or {}), **(self.extra or {})}
        return msg, kwargs
