"""Stored rows <-> links: the values as PostgreSQL holds them (plain text, or the product's dbcrypt ciphertext) and
the tokens the domain works with."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg

from broker.model import AccountState, Link, RefreshedTokens, Secret
from broker.postgres.dbcrypt import Cipher, DecryptFailed

#: The Go product stores "no expiry" as the zero time, 0001-01-01 00:00:00+00.
ZERO_TIME = datetime(1, 1, 1, tzinfo=UTC)


def normalise_expiry(expiry: datetime | None) -> datetime | None:
    """Map the product's zero time, NULL, and PostgreSQL's 'infinity'/'-infinity' (which asyncpg decodes as naive
    datetime.max/datetime.min) to None, "never expires"."""
    if expiry is None or expiry.tzinfo is None or expiry <= ZERO_TIME:
        return None
    return expiry


class Codec:
    """Stored values <-> tokens: plain text, or the product's dbcrypt when keys are configured."""

    def __init__(self, cipher: Cipher | None) -> None:
        self._cipher = cipher

    def link(self, user_id: UUID, row: asyncpg.Record | None) -> Link | None:
        if row is None:
            return None
        access, refresh, unreadable = self._open(row)
        marker_sha, idle = row.get("marker_sha256", None), row.get("marker_idle_seconds", None)
        return Link(
            user_id=user_id,
            access_token=Secret(access),
            refresh_token=Secret(refresh),
            expiry=normalise_expiry(row["expiry"]),
            account=AccountState.DISABLED if row["account_disabled"] else AccountState.ACTIVE,
            unreadable=unreadable,
            refresh_stored=row["refresh_token"] if row["refresh_key_id"] else None,
            # The marker counts only for the token stored now (it holds the SHA-256 of the plain token).
            marker_idle_seconds=idle if marker_sha is not None and marker_sha == Secret(refresh).sha256() else None,
            forced_seconds_ago=row.get("forced_seconds_ago", None),
            access_rejected=_rejected(row, access),
            reauth_fingerprint=row.get("reauth_fingerprint", None),
        )

    def _open(self, row: asyncpg.Record) -> tuple[str, str, str | None]:
        """(access, refresh, why unreadable) of a row; plain rows as they are."""
        values = []
        for column, key_column in (("access_token", "access_key_id"), ("refresh_token", "refresh_key_id")):
            stored, key_id = row[column] or "", row[key_column]
            if not key_id:
                values.append(stored)
                continue
            if self._cipher is None:
                return "", "", f"tokens are encrypted at rest (key {key_id}); set BROKER_ENCRYPTION_KEYS"
            try:
                values.append(self._cipher.decrypt(stored, key_id))
            except DecryptFailed as exc:
                return "", "", str(exc)
        return values[0], values[1], None

    def open_value(self, stored: str, key_id: str | None) -> tuple[str, str | None]:
        """(plain value, why unreadable) of one stored value; a value without a key id is plain text."""
        if not key_id:
            return stored, None
        if self._cipher is None:
            return "", f"encrypted at rest (key {key_id}); set BROKER_ENCRYPTION_KEYS"
        try:
            return self._cipher.decrypt(stored, key_id), None
        except DecryptFailed as exc:
            return "", str(exc)

    def seal(self, plain: Secret) -> tuple[str, str | None]:
        """(stored value, key id) for a token being written: encrypted under the primary key when configured."""
        if self._cipher is None:
            return plain.reveal(), None
        stored, key_id = self._cipher.encrypt(plain.reveal())
        return stored, key_id

    def store_args(self, user_id: UUID, previous: Link, tokens: RefreshedTokens) -> tuple[Any, ...]:
        # No expiry is NULL, written by the SQL as the product's zero time: asyncpg would encode
        # datetime(1, 1, 1, tzinfo=UTC) as '-infinity'.
        access, access_key = self.seal(tokens.access_token)
        refresh, refresh_key = self.seal(tokens.refresh_token)
        return (
            user_id,
            previous.refresh_as_stored,
            access,
            refresh,
            tokens.expiry,
            access_key,
            refresh_key,
            previous.refresh_token.sha256(),
        )


def _rejected(row: asyncpg.Record, access: str) -> bool:
    """Whether the row's rejection (the SHA-256 of an access token an upstream refused) is of the token it holds."""
    rejected = row.get("rejected_sha256", None)
    return rejected is not None and bool(access) and rejected == Secret(access).sha256()
