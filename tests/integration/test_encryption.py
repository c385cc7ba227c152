"""Tokens encrypted at rest as the Go product stores them (#12), on the product's schema (dbcrypt_keys and the
foreign keys from user_links' key-id columns), with the real oidc-provider for refreshes."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.app import App
from broker.config import Settings
from broker.errors import ConfigError
from broker.postgres.dbcrypt import KeysRejected, key_digest
from broker.v1 import token_broker_pb2 as pb
from tests.support.broker import broker_env, running_broker, warm_discovery
from tests.support.idp import OidcTestProvider
from tests.support.pg import Database

VECTORS_GO = Path(__file__).parents[1] / "fixtures" / "dbcrypt" / "vectors.go"
GO = Path(sys.executable).with_name("go")


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def seal(key: bytes, plain: str) -> str:
    """As the product encrypts: a random nonce (an implementation independent of the broker's)."""
    nonce = os.urandom(12)
    return base64.b64encode(nonce + AESGCM(key).encrypt(nonce, plain.encode(), None)).decode()


def go_decrypt(key: bytes, stored: str) -> str:
    """The Go program (standard library only) reads what the broker wrote."""
    env = dict(os.environ, GOFLAGS="-mod=mod", GOPROXY="off", GOCACHE=str(Path.home() / ".cache" / "go-build"))
    out = subprocess.run(
        [str(GO), "run", str(VECTORS_GO), "decrypt", b64(key), stored],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=VECTORS_GO.parent,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


async def add_key(db: Database, number: int, key: bytes, *, revoked: bool = False) -> str:
    digest = key_digest(key)
    await db.execute(
        "INSERT INTO dbcrypt_keys (number, active_key_digest, revoked_key_digest, test) VALUES ($1, $2, $3, $4)",
        number,
        digest,
        digest if revoked else None,
        seal(key, "coder"),
    )
    return digest


async def encrypted_user(
    db: Database, key: bytes, access: str, refresh: str, expiry: datetime, *, plain: bool = False
) -> uuid.UUID:
    uid = uuid.uuid4()
    await db.execute("INSERT INTO users (id, email, username) VALUES ($1, $2, $3)", uid, f"{uid}@x", str(uid))
    if plain:
        await db.insert_link(uid, access, refresh, expiry)
        return uid
    digest = key_digest(key)
    await db.execute(
        "INSERT INTO user_links (user_id, login_type, oauth_access_token, oauth_refresh_token, oauth_expiry,"
        " oauth_access_token_key_id, oauth_refresh_token_key_id) VALUES ($1, 'oidc', $2, $3, $4, $5, $5)",
        uid,
        seal(key, access),
        seal(key, refresh),
        expiry,
        digest,
    )
    return uid


def hour() -> datetime:
    return datetime.now(UTC) + timedelta(hours=1)


def ago() -> datetime:
    return datetime.now(UTC) - timedelta(minutes=5)


async def test_encrypted_rows_are_served_decrypted(product_db: Database) -> None:
    key = os.urandom(32)
    await add_key(product_db, 1, key)
    uid = await encrypted_user(product_db, key, "plain-access", "plain-refresh", hour())
    async with running_broker(broker_env(product_db, BROKER_ENCRYPTION_KEYS=b64(key))) as b:
        r = await b.get(uid)
    assert (r.status, r.access_token) == (pb.TOKEN_STATUS_VALID, "plain-access")


async def test_a_rejected_encrypted_token_is_not_served_after_a_failed_forced_refresh(
    product_db: Database, idp: OidcTestProvider
) -> None:
    """The rejection holds the SHA-256 of the plain token; the row holds ciphertext: the broker compares after
    decrypting."""
    key = os.urandom(32)
    await add_key(product_db, 1, key)
    issued = await idp.login(f"user-{uuid.uuid4()}")
    uid = await encrypted_user(product_db, key, issued.access_token, issued.refresh_token, hour())
    async with running_broker(broker_env(product_db, idp, BROKER_ENCRYPTION_KEYS=b64(key))) as b:
        await warm_discovery(b)
        idp.set_fault("down")
        rejected = hashlib.sha256(issued.access_token.encode()).hexdigest()
        await b.stub.GetOIDCAccessToken(
            pb.GetOIDCAccessTokenRequest(user_id=str(uid), rejected_token_sha256=rejected), timeout=10
        )
        plain = await b.get(uid)
    assert (plain.status, plain.access_token) == (pb.TOKEN_STATUS_IDP_UNAVAILABLE, "")


async def test_a_refresh_writes_back_encrypted_under_the_primary_and_the_go_program_reads_it(
    product_db: Database, idp: OidcTestProvider
) -> None:
    key = os.urandom(32)
    digest = await add_key(product_db, 1, key)
    issued = await idp.login(f"user-{uuid.uuid4()}")
    uid = await encrypted_user(product_db, key, issued.access_token, issued.refresh_token, ago())
    async with running_broker(broker_env(product_db, idp, BROKER_ENCRYPTION_KEYS=b64(key))) as b:
        r = await b.get(uid)
        again = await b.get(uid)
    assert r.status == pb.TOKEN_STATUS_REFRESHED
    assert (again.status, again.access_token) == (pb.TOKEN_STATUS_VALID, r.access_token)
    row = await product_db.link(uid)
    assert row is not None
    assert (row["oauth_access_token_key_id"], row["oauth_refresh_token_key_id"]) == (digest, digest)
    assert r.access_token not in row["oauth_access_token"]
    assert go_decrypt(key, row["oauth_access_token"]) == r.access_token
    assert go_decrypt(key, row["oauth_refresh_token"]) not in ("", issued.refresh_token)


async def test_rotation_old_key_rows_are_served_and_rewritten_under_the_new_primary(
    product_db: Database, idp: OidcTestProvider
) -> None:
    old, new = os.urandom(32), os.urandom(32)
    await add_key(product_db, 1, old)
    new_digest = await add_key(product_db, 2, new)
    issued = await idp.login(f"user-{uuid.uuid4()}")
    valid = await encrypted_user(product_db, old, "under-old", "r", hour())
    stale = await encrypted_user(product_db, old, issued.access_token, issued.refresh_token, ago())
    env = broker_env(product_db, idp, BROKER_ENCRYPTION_KEYS=f"{b64(new)},{b64(old)}")
    async with running_broker(env) as b:
        served = await b.get(valid)
        refreshed = await b.get(stale)
    assert (served.status, served.access_token) == (pb.TOKEN_STATUS_VALID, "under-old")
    assert refreshed.status == pb.TOKEN_STATUS_REFRESHED
    row = await product_db.link(stale)
    assert row is not None
    assert row["oauth_refresh_token_key_id"] == new_digest
    assert go_decrypt(new, row["oauth_access_token"]) == refreshed.access_token


async def test_plain_rows_keep_working_and_are_written_back_encrypted(
    product_db: Database, idp: OidcTestProvider
) -> None:
    key = os.urandom(32)
    digest = await add_key(product_db, 1, key)
    issued = await idp.login(f"user-{uuid.uuid4()}")
    valid = await encrypted_user(product_db, key, "plain-valid", "r", hour(), plain=True)
    stale = await encrypted_user(product_db, key, issued.access_token, issued.refresh_token, ago(), plain=True)
    async with running_broker(broker_env(product_db, idp, BROKER_ENCRYPTION_KEYS=b64(key))) as b:
        assert (await b.get(valid)).access_token == "plain-valid"
        r = await b.get(stale)
    assert r.status == pb.TOKEN_STATUS_REFRESHED
    row = await product_db.link(stale)
    assert row is not None
    assert row["oauth_access_token_key_id"] == digest
    assert go_decrypt(key, row["oauth_access_token"]) == r.access_token


async def test_a_revoked_keys_rows_are_not_served(product_db: Database, caplog: pytest.LogCaptureFixture) -> None:
    primary, revoked = os.urandom(32), os.urandom(32)
    await add_key(product_db, 1, primary)
    revoked_digest = await add_key(product_db, 2, revoked, revoked=True)
    uid = await encrypted_user(product_db, revoked, "must-not-be-served", "r", hour())
    env = broker_env(product_db, BROKER_ENCRYPTION_KEYS=f"{b64(primary)},{b64(revoked)}")
    with caplog.at_level(logging.ERROR):
        async with running_broker(env) as b:
            r = await b.get(uid)
    assert (r.status, r.access_token) == (pb.TOKEN_STATUS_STORE_UNAVAILABLE, "")
    assert f"revoked key {revoked_digest}" in caplog.text
    assert "must-not-be-served" not in caplog.text


async def test_without_keys_an_encrypted_row_names_the_missing_setting(
    product_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    key = os.urandom(32)
    await add_key(product_db, 1, key)
    uid = await encrypted_user(product_db, key, "secret-a", "secret-r", hour())
    with caplog.at_level(logging.ERROR):
        async with running_broker(broker_env(product_db)) as b:
            r = await b.get(uid)
    assert (r.status, r.access_token) == (pb.TOKEN_STATUS_STORE_UNAVAILABLE, "")
    assert "set BROKER_ENCRYPTION_KEYS" in caplog.text


@pytest.mark.parametrize("case", ["missing", "revoked", "wrong-test"])
async def test_a_primary_key_the_database_does_not_vouch_for_stops_start_up(product_db: Database, case: str) -> None:
    key = os.urandom(32)
    if case == "revoked":
        await add_key(product_db, 1, key, revoked=True)
    elif case == "wrong-test":
        await product_db.execute(
            "INSERT INTO dbcrypt_keys (number, active_key_digest, test) VALUES (1, $1, $2)",
            key_digest(key),
            seal(key, "not coder"),
        )
    app = App(Settings.from_env(broker_env(product_db, BROKER_ENCRYPTION_KEYS=b64(key))))
    with pytest.raises(KeysRejected) as err:
        await app.start()
    await app.stop()
    assert b64(key) not in str(err.value)
    assert key_digest(key) in str(err.value)
    assert "BROKER_ENCRYPTION_KEYS" in str(err.value)  # names the setting to fix


def test_bad_keys_are_a_configuration_error_without_the_value() -> None:
    bad = base64.b64encode(b"sixteen-byte-key").decode()
    with pytest.raises(ConfigError, match=r"BROKER_ENCRYPTION_KEYS: key 1 decodes to 16 bytes") as err:
        Settings.from_env({"BROKER_DATABASE_URL": "postgresql://x@h/d", "BROKER_ENCRYPTION_KEYS": bad})
    assert bad not in str(err.value)
