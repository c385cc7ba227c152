"""dbcrypt against vectors made by a Go program with the standard library only (tests/fixtures/dbcrypt/)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.errors import ConfigError
from broker.model import DbKey
from broker.postgres.dbcrypt import Cipher, DecryptFailed, KeysRejected, key_digest, parse_keys

VECTORS = json.loads((Path(__file__).parents[1] / "fixtures" / "dbcrypt" / "vectors.json").read_text())


def go_style(key: bytes, plain: str) -> str:
    """An independent encryption as the product does it: a random nonce."""
    nonce = os.urandom(12)
    return base64.b64encode(nonce + AESGCM(key).encrypt(nonce, plain.encode(), None)).decode()


class TestGoVectors:
    @pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"{v['key_id']}:{v['plain'][:8]!r}")
    def test_every_vector_decrypts_and_every_digest_matches(self, vector: dict[str, str]) -> None:
        key = base64.b64decode(vector["key"])
        assert key_digest(key) == vector["key_id"]
        assert Cipher([key]).decrypt(vector["stored"], vector["key_id"], check_active=False) == vector["plain"]


class TestCipher:
    key, old = os.urandom(32), os.urandom(32)

    def test_encryption_round_trips_is_deterministic_and_readable_by_an_independent_implementation(self) -> None:
        c = Cipher([self.key])
        stored, key_id = c.encrypt("token-1")
        assert key_id == key_digest(self.key)
        assert c.encrypt("token-1") == (stored, key_id)  # the compare-and-set needs this
        raw = base64.b64decode(stored)
        assert AESGCM(self.key).decrypt(raw[:12], raw[12:], None) == b"token-1"
        assert c.decrypt(stored, key_id, check_active=False) == "token-1"

    def test_the_old_key_decrypts_the_primary_encrypts(self) -> None:
        c = Cipher([self.key, self.old])
        assert c.decrypt(go_style(self.old, "under-old"), key_digest(self.old), check_active=False) == "under-old"
        assert c.encrypt("x")[1] == key_digest(self.key)

    @pytest.mark.parametrize(
        ("stored", "key_id", "reason"),
        [
            ("not base64 !", None, "not valid base64"),
            (base64.b64encode(b"short").decode(), None, "too short"),
            ("tampered", None, "failed authentication"),
            ("ok", "abcdef0", "not configured"),
        ],
    )
    def test_what_cannot_be_decrypted_says_why_and_never_the_value(
        self, stored: str, key_id: str | None, reason: str
    ) -> None:
        c = Cipher([self.key])
        if stored == "tampered":
            raw = bytearray(base64.b64decode(go_style(self.key, "secret-value")))
            raw[-1] ^= 1
            stored = base64.b64encode(bytes(raw)).decode()
        if stored == "ok":
            stored = go_style(self.key, "secret-value")
        with pytest.raises(DecryptFailed, match=reason) as err:
            c.decrypt(stored, key_id or key_digest(self.key), check_active=False)
        assert "secret-value" not in str(err.value)

    def test_start_up_check(self) -> None:
        digest = key_digest(self.key)
        good = DbKey(digest, None, go_style(self.key, "coder"))
        Cipher([self.key]).check([good])
        for rows, reason in (
            ([DbKey(key_digest(self.old), None, go_style(self.old, "coder"))], "not in dbcrypt_keys"),
            ([DbKey(None, digest, go_style(self.key, "coder"))], "revoked"),
            ([DbKey(digest, None, go_style(self.key, "not coder"))], "test value"),
        ):
            with pytest.raises(KeysRejected, match=reason) as err:
                Cipher([self.key]).check(rows)
            assert str(err.value).startswith("BROKER_ENCRYPTION_KEYS")  # the refusal names the setting to fix
            assert isinstance(err.value, ConfigError)  # exit 2: restarting cannot help

    def test_a_revoked_key_is_not_used_to_read(self) -> None:
        c = Cipher([self.key, self.old])
        old = key_digest(self.old)
        c.check([DbKey(key_digest(self.key), None, go_style(self.key, "coder")), DbKey(old, old, "t")])
        with pytest.raises(DecryptFailed, match="revoked"):
            c.decrypt(go_style(self.old, "x"), old)


class TestParseKeys:
    def test_the_products_list_format(self) -> None:
        a, b = os.urandom(32), os.urandom(32)
        text = f"{base64.b64encode(a).decode()}, {base64.b64encode(b).decode()}"
        assert parse_keys(text) == [a, b]

    @pytest.mark.parametrize(
        ("text", "error"),
        [
            ("", "key 1 is empty"),
            ("not-base64!", "key 1 is not valid base64"),
            (base64.b64encode(b"short").decode(), "key 1 decodes to 5 bytes"),
            (f"{base64.b64encode(b'k' * 32).decode()},{base64.b64encode(b'k' * 32).decode()}", "listed twice"),
        ],
    )
    def test_bad_lists_name_the_position_not_the_value(self, text: str, error: str) -> None:
        with pytest.raises(ValueError, match=error) as err:
            parse_keys(text)
        assert base64.b64encode(b"k" * 32).decode() not in str(err.value)
