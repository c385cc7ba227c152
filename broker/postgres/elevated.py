"""Whether the elevated role is safe to own the broker's SECURITY DEFINER functions.

`token_broker_elevated` owns every function that reads or writes the token columns, so nobody may log in as it and
no role may reach it through a membership: not the service role (directly or through any role it belongs to, with
MEMBER, SET or USAGE), and no other role either. `migrate` refuses an unsafe role (exit 2); `serve` keeps readiness
NOT_SERVING until it is fixed. Each problem comes with the statement that fixes it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from broker.errors import StoreUnavailable

if TYPE_CHECKING:
    from broker.postgres.store import PostgresStore

log = logging.getLogger("broker.app")

ELEVATED = "token_broker_elevated"

_ROLE = "SELECT r.rolcanlogin FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) $1"
_SERVICE_ROLE = "SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) $1"
# MEMBER covers SET and USAGE (and, from PostgreSQL 16 on, a membership that grants neither); both are asked, since
# that is what the service role must not have. The second column: the direct members it reaches the role through.
_REACHES = (
    "SELECT pg_catalog.pg_has_role($1, $2, 'MEMBER') OR pg_catalog.pg_has_role($1, $2, 'USAGE'),"
    " ARRAY(SELECT m.rolname::pg_catalog.text FROM pg_catalog.pg_auth_members a"
    " JOIN pg_catalog.pg_roles m ON m.oid OPERATOR(pg_catalog.=) a.member"
    " WHERE a.roleid OPERATOR(pg_catalog.=) $2::pg_catalog.regrole AND pg_catalog.pg_has_role($1, m.oid, 'MEMBER')"
    " ORDER BY 1)"
)
_MEMBERS = (
    "SELECT DISTINCT m.rolname::pg_catalog.text FROM pg_catalog.pg_auth_members a"
    " JOIN pg_catalog.pg_roles m ON m.oid OPERATOR(pg_catalog.=) a.member"
    " WHERE a.roleid OPERATOR(pg_catalog.=) $1::pg_catalog.regrole AND NOT m.rolsuper"
    " AND m.rolname::pg_catalog.text OPERATOR(pg_catalog.<>) ALL($2::pg_catalog.text[])"
    " AND NOT (m.rolcreaterole AND $3::pg_catalog.bool) ORDER BY 1"
)


async def elevated_role_problems(
    conn: Any, service_roles: Sequence[str], *, allowed_members: Sequence[str] = (), administrators: bool = False
) -> list[str]:
    """What makes the elevated role unsafe, each with its fix; [] when it is safe or does not exist yet.

    Members are allowed when they are superusers, named in `allowed_members` (the role that runs migrate: on
    PostgreSQL 16 and later an administrator with CREATEROLE is made a member of the roles it creates, and a
    function's owner can be changed only by a member of the new owner), or, with `administrators`, hold CREATEROLE
    (at serve time, when the role that migrated is not known: such a role could make itself a member anyway)."""
    can_login = await conn.fetchval(_ROLE, ELEVATED)
    if can_login is None:
        return []
    problems = []
    if can_login:
        problems.append(f"{ELEVATED} can log in: ALTER ROLE {ELEVATED} NOLOGIN")
    for role in dict.fromkeys(service_roles):
        superuser = await conn.fetchval(_SERVICE_ROLE, role)
        if superuser is None:
            continue  # created by migrate, after this check
        if superuser:
            problems.append(f"the service role {role} is a superuser: ALTER ROLE {role} NOSUPERUSER")
            continue
        reaches, through = await conn.fetchrow(_REACHES, role, ELEVATED)
        if reaches:
            fixes = [
                f"REVOKE {ELEVATED} FROM {m}" if m == role else f"take {role} out of {m}, or REVOKE {ELEVATED} FROM {m}"
                for m in through
            ]
            problems.append(f"the service role {role} is a member of {ELEVATED}: " + "; ".join(fixes))
    members = await conn.fetch(_MEMBERS, ELEVATED, list(allowed_members), administrators)
    problems += [f"{m[0]} is a member of {ELEVATED}: REVOKE {ELEVATED} FROM {m[0]}" for m in members]
    return problems


class ElevatedRoleGate:
    """The serve-time check, for readiness: False while the elevated role is unsafe (logged at ERROR with what to fix,
    again only when the problems change), checked at every readiness probe until it passes once."""

    def __init__(self, store: PostgresStore, service_role: str) -> None:
        self._store = store
        self._service_role = service_role
        self._safe = False
        self._failed = False
        self._logged: list[str] = []

    async def __call__(self, timeout: float) -> bool:
        if self._safe:
            return True
        try:
            problems = await self._store.run(timeout, "checking the elevated role", self._problems)
        except StoreUnavailable as exc:
            if not self._failed:  # the database answered its ping just before: say why readiness waits, once
                self._failed = True
                log.warning("could not check the elevated database role, so this broker is not ready yet: %s", exc)
            return False
        if problems:
            if problems != self._logged:
                self._logged = problems
                log.error(
                    "the elevated database role is unsafe, so this broker is not ready; fix it and readiness follows:"
                    " %s",
                    "; ".join(problems),
                )
            return False
        if self._logged:
            log.info("the elevated database role is safe now")
        self._safe = True
        return True

    async def _problems(self, conn: Any) -> list[str]:
        session_user = await conn.fetchval("SELECT session_user")
        return await elevated_role_problems(conn, [self._service_role, session_user], administrators=True)
