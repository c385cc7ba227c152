"""SHA-256 digests a caller writes (caller tokens in a file, a reported rejected token) follow one rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.errors import ConfigError
from broker.model import parse_sha256_hex
from broker.server.callers import load_caller_tokens


def test_one_sha256_rule_for_caller_tokens_and_reported_tokens(tmp_path: Path) -> None:
    """A caller token's digest in the file and a reported rejected token follow the same rule: 64 hex
    characters, either case."""
    digest = "AB" * 32
    tokens_file = tmp_path / "callers"
    tokens_file.write_text(f"worker:{digest}\n")
    assert load_caller_tokens(tokens_file) == {"worker": bytes.fromhex(digest)}
    assert parse_sha256_hex(digest) == bytes.fromhex(digest)
    for bad in ("ab" * 31, "zz" * 32, "ab" * 33, " " + "ab" * 32):
        tokens_file.write_text(f"worker:{bad}\n")
        with pytest.raises(ConfigError):
            load_caller_tokens(tokens_file)
        with pytest.raises(ValueError, match="SHA-256"):
            parse_sha256_hex(bad)
