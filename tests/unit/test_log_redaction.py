"""Redaction in the JSON log: every form of a configured secret is replaced, whatever characters it holds, in the
message, the extra fields and the traceback alike; a sink that fails raises into no caller."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from broker.telemetry import logs

SECRETS = ['cl"ient\\sécret', "p@ss wörd/ü", "plain-secret-value", "ünïcode-😀-key"]


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    # As the CLI passes them: a DSN's password percent-encoded, the client secret as given.
    logs.configure("DEBUG", redact=[SECRETS[0], quote(SECRETS[1], safe=""), SECRETS[2], SECRETS[3]], stream=stream)
    yield stream
    root.handlers[:], level = saved
    root.setLevel(level)
    logs._direct = None


def _forms(secret: str) -> list[str]:
    return [secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1], quote(secret, safe="")]


def _assert_clean(text: str) -> None:
    for secret in SECRETS:
        for form in _forms(secret):
            assert form not in text
        assert repr(secret)[1:-1] not in text


@pytest.mark.parametrize("secret", SECRETS)
def test_a_secret_in_the_message_the_fields_and_the_traceback_is_redacted(out: io.StringIO, secret: str) -> None:
    log = logging.getLogger("broker.test")
    log.warning("failed with %s", secret, extra={"detail": f"x{secret}y", "nested": {"k": [secret]}})
    try:
        raise RuntimeError(f"connect to postgresql://u:{quote(secret, safe='')}@h/db failed ({secret!r})")
    except RuntimeError:
        log.exception("boom")
    text = out.getvalue()
    _assert_clean(text)
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines[0]["msg"] == "failed with [REDACTED]"
    assert lines[0]["detail"] == "x[REDACTED]y"
    assert lines[0]["nested"] == {"k": ["[REDACTED]"]}
    assert "postgresql://u:[REDACTED]@h/db" in lines[1]["exc"]


def test_the_fast_audit_line_is_redacted_too(out: io.StringIO) -> None:
    logs.info_line(logging.getLogger("broker.audit"), "token request", {"peer": SECRETS[1], "caller": SECRETS[0]})
    line = json.loads(out.getvalue())
    assert line["peer"] == "[REDACTED]"
    assert line["caller"] == "[REDACTED]"
    _assert_clean(out.getvalue())


def test_a_line_without_secrets_is_unchanged(out: io.StringIO) -> None:
    logs.info_line(logging.getLogger("broker.audit"), "token request", {"peer": "ipv4:127.0.0.1:1", "n": 3})
    line = json.loads(out.getvalue())
    assert (line["msg"], line["peer"], line["n"]) == ("token request", "ipv4:127.0.0.1:1", 3)


class _BrokenStream(io.StringIO):
    def write(self, s: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_failing_sink_raises_nowhere_and_is_reported_once(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("INFO", stream=_BrokenStream())
        for _ in range(3):
            logs.info_line(logging.getLogger("broker.audit"), "token request", {"n": 1})  # the fast path
            logging.getLogger("broker.test").error("through logging")  # logging's own emit
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        logs._direct = None
    err = capsys.readouterr().err
    assert err.count("writing the log failed: BrokenPipeError (Broken pipe)") == 1, err
