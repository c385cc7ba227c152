"""Command line: `token-broker serve | migrate | get | dev`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit

from broker import __version__
from broker.config import DevSettings, Settings, client_target, process_environment
from broker.errors import BrokerError, ConfigError, MigrationRefused
from broker.telemetry import logs
from broker.workers import record_refusal

log = logging.getLogger("broker.cli")

#: The top-level modules of the optional extras, by extra: what `serve`, `migrate` and `dev` need beyond the base
#: distribution (the client and `get`/`health`).
_EXTRA_MODULES = {
    "server": frozenset(
        {"asyncpg", "authlib", "httpx2", "prometheus_client", "cryptography", "grpc_reflection", "uvloop"}
    ),
    "tracing": frozenset({"opentelemetry"}),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="token-broker",
        description="Serves users' OIDC access tokens over gRPC. Configured by BROKER_* environment variables.",
    )
    p.add_argument("--version", action="version", version=f"token-broker {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "serve",
        help="run the gRPC server until SIGTERM/SIGINT",
        description="Run the gRPC server (BROKER_LISTEN) and /metrics until SIGTERM or SIGINT.",
    )
    sub.add_parser(
        "migrate",
        help="apply database migrations (BROKER_MIGRATE_DATABASE_URL)",
        description="Create the broker's schema, roles, grants and functions. Idempotent; safe to run "
        "concurrently. Uses BROKER_MIGRATE_DATABASE_URL (default BROKER_DATABASE_URL).",
    )
    get = sub.add_parser(
        "get",
        help="call GetOIDCAccessToken and print the status and expiry",
        description="Call the running broker for USER_ID; prints status and expiry, and the token "
        "only with --show-token.",
    )
    get.add_argument("user_id", metavar="USER_ID", help="the user's UUID")
    get.add_argument("--target", default=None, help="HOST:PORT of the broker (default: BROKER_LISTEN)")
    get.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds (default 5)")
    get.add_argument("--show-token", action="store_true", help="also print the access token")
    health = sub.add_parser(
        "health",
        help="check a broker's gRPC health (exit 0 when SERVING)",
        description="Call grpc.health.v1.Health/Check; exit 0 when SERVING, 1 otherwise. For container health "
        "checks and `helm test`.",
    )
    health.add_argument("--target", default=None, help="HOST:PORT (default: BROKER_LISTEN)")
    health.add_argument("--service", default="broker.v1.TokenBroker", help='service name; "" for liveness')
    health.add_argument("--timeout", type=float, default=3.0)
    sub.add_parser(
        "dev",
        help="local run: embedded PostgreSQL under .data/ when BROKER_DATABASE_URL is unset, migrate, serve",
        description="For `make run`: with BROKER_DATABASE_URL unset, start an embedded PostgreSQL under "
        ".data/, migrate it, and serve; otherwise migrate and serve.",
    )
    return p


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = _parser().parse_args(argv)
    env = process_environment() if environ is None else dict(environ)
    try:
        if args.command == "get":
            return asyncio.run(_get(args, env))
        if args.command == "health":
            return _health(args, env)
        settings = Settings.from_env(env)
        secrets = [s.reveal() for s in (settings.oidc_client_secret,) if s]
        secrets += [
            p for s in (settings.database_url, settings.migrate_database_url) if s and (p := _password(s.reveal()))
        ]
        logs.configure(settings.log_level, redact=secrets, trace_ids=settings.tracing)
        if args.command == "migrate":
            return asyncio.run(_migrate(settings))
        if args.command == "dev":
            return _dev(env)
        if settings.worker_index is None and settings.workers > 1:
            from broker.workers.supervisor import supervise

            settings.require_database()  # what a worker would refuse, refused before any starts
            return supervise(settings, env)
        from broker.app import serve

        _run(serve(settings, exit_process=_exit_now), settings.event_loop)
        return 0
    except (ConfigError, MigrationRefused) as exc:
        # Exit 2 means only this: a setting (or the database's state) must be fixed; starting again cannot help.
        print(f"token-broker: {exc}", file=sys.stderr)
        record_refusal(env, str(exc))
        return 2
    except BrokerError as exc:
        # A failure that may pass (the database unreachable at start-up): exit 1, and a worker's supervisor (or
        # the kubelet) starts it again.
        print(f"token-broker: cannot start: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        extra = _missing_extra(exc)
        if extra is None:
            raise
        print(
            f"token-broker: `{args.command}` needs the {extra} extra (no module named {exc.name!r}): "
            f"pip install 'token-broker[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130


def _missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The extra that provides the module `exc` did not find, if it is one of theirs."""
    top = (exc.name or "").partition(".")[0]
    return next((extra for extra, modules in _EXTRA_MODULES.items() if top in modules), None)


def _run(main: Coroutine[Any, Any, None], event_loop: str) -> None:
    """Run the server on uvloop (libuv: measurably less CPU per request than asyncio's loop) unless asked not to or
    not installed."""
    if event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            logging.getLogger("broker.app").warning("uvloop is not installed; running on asyncio's event loop")
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def _exit_now(code: int) -> NoReturn:
    """End the `serve` process once everything is closed: the open gRPC connections close with it, and calls still
    on their way get UNAVAILABLE (retryable) rather than the CANCELLED of gRPC's own server stop."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _password(dsn: str) -> str | None:
    try:
        return urlsplit(dsn).password
    except ValueError:
        return None


async def _migrate(settings: Settings) -> int:
    from broker.errors import ConfigError
    from broker.postgres.migrate import migrate

    if settings.migrate_database_url is None:
        raise ConfigError("invalid configuration:\n  BROKER_MIGRATE_DATABASE_URL or BROKER_DATABASE_URL: required")
    report = await migrate(settings.migrate_database_url.reveal(), settings.db_service_role)
    log.info("migrations done", extra={"applied": report.applied, "already_applied": report.already_applied})
    return 0


async def _get(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    import grpc

    from broker.client import TokenBrokerClient

    target = args.target or client_target(env)
    async with TokenBrokerClient(target, timeout=args.timeout) as client:
        try:
            token = await client.get_oidc_access_token(args.user_id)
        except grpc.aio.AioRpcError as exc:
            print(f"token-broker: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"status: {token.status.name}")
    print(f"expires_at: {token.expires_at.isoformat() if token.expires_at else '-'}")
    if args.show_token:
        print(f"access_token: {token.access_token}")
    return 0


def _health(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = args.target or client_target(env)
    with grpc.insecure_channel(target) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"token-broker: health check failed: {exc.code().name}", file=sys.stderr)
            return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(name)
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


def _dev(env: dict[str, str]) -> int:
    """Embedded PostgreSQL when no database is configured; then migrate and serve in this process."""
    from broker.app import serve
    from broker.postgres.migrate import migrate

    pg = None
    dev = DevSettings.from_env(env)
    if not dev.database_configured:
        from broker.postgres.embedded import EmbeddedPostgres

        pg = EmbeddedPostgres(dev.data_dir / "postgres", port=dev.port).start()
        env["BROKER_MIGRATE_DATABASE_URL"] = pg.url()
        env["BROKER_DATABASE_URL"] = pg.url(user=dev.service_role)
        log.info("embedded PostgreSQL started", extra={"port": pg.port, "datadir": str(pg.datadir)})
    try:
        settings = Settings.from_env(env)
        assert settings.migrate_database_url is not None
        asyncio.run(migrate(settings.migrate_database_url.reveal(), settings.db_service_role))
        asyncio.run(serve(settings))
    finally:
        if pg is not None:
            pg.stop()
    return 0
