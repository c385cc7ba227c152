"""Structured logs: one JSON object per line on stdout, with secrets scrubbed as a last line of defence."""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import quote, unquote

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Formats a record as JSON: ts, level, logger, msg, the record's `extra` fields, and any traceback.

    Values listed in `redact` (the client secret, the DSN password) are replaced wherever they appear, in each of
    the forms they take: as given, percent-decoded and percent-encoded (a DSN's password), and as Python's repr
    writes them (a traceback). Redaction happens before JSON encoding, so a secret with a quote, a backslash or a
    non-ASCII character is caught too; the encoded line is only searched for the secrets' encoded forms, so a line
    without a secret (every audit line) costs one encoding.
    """

    def __init__(self, redact: Iterable[str] = (), *, trace_ids: bool = False) -> None:
        super().__init__()
        forms: set[str] = set()
        for secret in redact:
            if secret:
                plain = unquote(secret)
                forms.update((secret, plain, quote(plain, safe=""), repr(secret)[1:-1], repr(plain)[1:-1]))
        # Longest first: a form that contains another is replaced whole.
        self._redact = sorted((f for f in forms if len(f) >= 4), key=len, reverse=True)
        self._encoded = sorted({json.dumps(f)[1:-1] for f in self._redact}, key=len, reverse=True)
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
        # JSON escapes character by character, so a secret anywhere in a value shows in the line as its escaped form.
        if any(encoded in line for encoded in self._encoded):
            line = json.dumps(self._scrub(entry), separators=(",", ":"))
        return line

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            for form in self._redact:
                if form in value:
                    value = value.replace(form, "[REDACTED]")
            return value
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, dict):
            return {self._scrub(str(k)): self._scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._scrub(v) for v in value]
        return self._scrub(str(value))


class SinkHandler(logging.StreamHandler[TextIO]):
    """The stream handler `configure` installs. A sink that fails (stdout a closed pipe, a full disk) never raises
    into the code that logs, so it never changes an answer: as with logging's own `handleError`, nothing is reported
    when `logging.raiseExceptions` is off; otherwise the first failure is reported on stderr, once, in one line (a
    traceback per request would flood stderr, and the failing line may carry what it was about to log)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._reported = threading.Event()

    def handleError(self, record: logging.LogRecord | None) -> None:  # noqa: N802 - logging's name
        self.sink_failed()

    def sink_failed(self) -> None:
        """Called inside the `except` of a failed write."""
        if not logging.raiseExceptions or self._reported.is_set():
            return
        self._reported.set()
        exc = sys.exc_info()[1]
        reason = type(exc).__name__ + (f" ({exc.strerror})" if isinstance(exc, OSError) and exc.strerror else "")
        try:
            sys.stderr.write(f"token-broker: writing the log failed: {reason}; later failures are not reported\n")
            sys.stderr.flush()
        except Exception:  # noqa: S110 - stderr is gone too: there is nowhere left to say it
            pass


_direct: tuple[SinkHandler, JsonFormatter] | None = None


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
        try:
            handler.stream.write(line)
            handler.stream.flush()
        except Exception:
            handler.sink_failed()


def configure(level: str, redact: Iterable[str] = (), stream: TextIO | None = None, *, trace_ids: bool = False) -> None:
    """Route every logger to one JSON handler on stdout at `level`; with `trace_ids`, lines written inside a span
    carry its trace_id and span_id."""
    global _direct
    handler = SinkHandler(stream or sys.stdout)
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
