"""Tokens encrypted at rest exactly as the Go product stores them ("dbcrypt"), with keys parsed once.

The format (facts of the product's source): AES-256-GCM, a 32-byte key, a 12-byte nonce, a 16-byte tag, no
associated data; the stored value is standard base64 of nonce || ciphertext || tag; the key id beside it is the first
7 hex characters of sha256(b"aes256gcm" + key); NULL or empty key id means plain text. Keys come as a comma-separated
list of base64 keys: the first (primary) encrypts, the others only decrypt (rotation).

The nonce is derived from the value (HMAC-SHA256 under a key derived from the primary key, first 12 bytes) instead
of drawn at random: the same token always encrypts to the same stored text, so the write-back's compare-and-set and
its idempotent retry keep working. Any nonce decrypts the same way, so the product reads these values unchanged. The
cost: two rows holding the same token would show equal ciphertexts (tokens are unique random values).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.errors import BrokerError, ConfigError
from broker.model import DbKey

NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
TEST_PLAINTEXT = "coder"  # what dbcrypt_keys.test decrypts to under its key


class DecryptFailed(BrokerError):
    """A stored value could not be decrypted; the message names the reason and the key id, never the value."""


class KeysRejected(ConfigError):
    """The configured keys do not match the database's dbcrypt_keys: the broker must not start (a configuration
    error: the message names BROKER_ENCRYPTION_KEYS)."""


_SETTING = "BROKER_ENCRYPTION_KEYS (or BROKER_ENCRYPTION_KEYS_FILE)"


def key_digest(key: bytes) -> str:
    return hashlib.sha256(b"aes256gcm" + key).hexdigest()[:7]


def parse_keys(text: str) -> list[bytes]:
    """The product's list format; ValueError naming the position of a bad entry (never its value)."""
    keys = []
    for i, item in enumerate((part.strip() for part in text.split(",")), 1):
        if not item:
            raise ValueError(f"key {i} is empty")
        try:
            key = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"key {i} is not valid base64") from None
        if len(key) != KEY_BYTES:
            raise ValueError(f"key {i} decodes to {len(key)} bytes, not {KEY_BYTES}")
        keys.append(key)
    if len({key_digest(k) for k in keys}) != len(keys):
        raise ValueError("a key is listed twice")
    return keys


class Cipher:
    """Decrypts with any configured key that the database lists as active; encrypts with the primary."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("no keys")
        self._keys = {key_digest(k): AESGCM(k) for k in keys}
        self.primary_digest = key_digest(keys[0])
        self._primary = self._keys[self.primary_digest]
        self._nonce_key = hmac.new(keys[0], b"token-broker dbcrypt nonce", hashlib.sha256).digest()
        self._revoked: frozenset[str] = frozenset()
        self._active: frozenset[str] = frozenset()

    def check(self, rows: list[DbKey]) -> None:
        """Start-up: the primary key must be active (not revoked) in dbcrypt_keys and decrypt its test value.
        Raises KeysRejected with the reason; remembers which digests are active and which revoked."""
        active = {r.active_digest: r for r in rows if r.active_digest}
        revoked = {r.revoked_digest for r in rows if r.revoked_digest}
        if self.primary_digest in revoked:
            raise KeysRejected(
                f"{_SETTING}: the primary (first) key ({self.primary_digest}) is revoked in dbcrypt_keys; put the "
                "product's current primary key first"
            )
        row = active.get(self.primary_digest)
        if row is None:
            raise KeysRejected(
                f"{_SETTING}: the primary (first) key ({self.primary_digest}) is not in dbcrypt_keys: the product "
                "inserts its primary key when it starts with it; start the product with these keys first"
            )
        try:
            ok = self.decrypt(row.test, self.primary_digest, check_active=False) == TEST_PLAINTEXT
        except DecryptFailed:
            ok = False
        if not ok:
            raise KeysRejected(
                f"{_SETTING}: dbcrypt_keys' test value does not decrypt under the primary (first) key "
                f"({self.primary_digest}): it is not the key the product encrypted with"
            )
        self._active = frozenset(active)
        self._revoked = frozenset(revoked)

    def decrypt(self, stored: str, key_id: str, *, check_active: bool = True) -> str:
        if check_active and key_id in self._revoked:
            raise DecryptFailed(f"encrypted with revoked key {key_id}")
        aead = self._keys.get(key_id)
        if aead is None:
            raise DecryptFailed(f"encrypted with key {key_id}, which is not configured")
        try:
            raw = base64.b64decode(stored, validate=True)
        except (binascii.Error, ValueError):
            raise DecryptFailed(f"value under key {key_id} is not valid base64") from None
        if len(raw) < NONCE_BYTES + TAG_BYTES:
            raise DecryptFailed(f"value under key {key_id} is too short")
        try:
            plain = aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], None)
        except InvalidTag:
            raise DecryptFailed(f"value under key {key_id} failed authentication") from None
        try:
            return plain.decode()
        except UnicodeDecodeError:
            raise DecryptFailed(f"value under key {key_id} is not text") from None

    def encrypt(self, plain: str) -> tuple[str, str]:
        """(stored value, key id) under the primary key; the same plain text always gives the same value."""
        data = plain.encode()
        nonce = hmac.new(self._nonce_key, data, hashlib.sha256).digest()[:NONCE_BYTES]
        sealed = self._primary.encrypt(nonce, data, None)
        return base64.b64encode(nonce + sealed).decode(), self.primary_digest
