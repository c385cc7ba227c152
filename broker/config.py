"""Settings: one frozen dataclass built once from an injected environment mapping. The ONLY reader of the environment.

A bad value fails fast with one message that names every bad variable. Secrets have no defaults and may come from
files (`*_FILE`), so they need not sit in the environment.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from broker.envreader import EnvReader
from broker.errors import ConfigError
from broker.model import Secret
from broker.telemetry.tracing import wanted as tracing_wanted
from broker.urls import check_url, is_loopback_host

#: A role name `migrate` can write into SQL with %I and no surprises; the one rule, used by migrate too.
ROLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
#: BROKER_TRUSTED_PROXY_IDENTITY's values: no sidecar, Envoy/Istio's XFCC header, Linkerd's l5d-client-id.
PROXY_IDENTITY_MODES = ("none", "xfcc", "l5d")
#: Where a local sidecar's connections come from: Linkerd's proxy and Envoy with localhost forwarding use the
#: loopback address; Istio's inbound passthrough uses 127.0.0.6 as the source of the forwarded connection.
DEFAULT_TRUSTED_PEERS = ("127.0.0.1", "::1", "127.0.0.6")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
AUTH_METHODS = ("client_secret_basic", "client_secret_post")
#: The smallest BROKER_DB_POOL_MAX that serves: a connection held for reads, a refresh holding its row lock, and one
#: for the short statements (that refresh's in-flight marker, heartbeats, write-backs, the readiness check).
DB_POOL_SMALLEST = 3


def pool_shares(pool_max: int) -> tuple[int, int]:
    """(connections held for reads, refreshes at once) in a pool of `pool_max`. The rest, at least one connection,
    serves the short statements: a refresh that holds its row lock always gets a connection for its in-flight marker,
    and the readiness check one for its ping."""
    reads = 2 if pool_max >= 6 else 1
    return reads, max(1, min(pool_max // 2, pool_max - reads - 1))


@dataclass(frozen=True)
class EventSettings:
    """Link events (docs/link-events.md): the webhook and the WatchLinkEvents stream."""

    webhook_url: str | None = field(default=None, repr=False)  # its query or user info may hold a credential
    """BROKER_WEBHOOK_URL: where link events are POSTed (Standard Webhooks); https unless loopback or
    BROKER_WEBHOOK_ALLOW_HTTP. Unset: no webhook."""
    webhook_secret: Secret | None = None
    """BROKER_WEBHOOK_SECRET or BROKER_WEBHOOK_SECRET_FILE: the signing secret, `whsec_` + base64 (24 to 64 bytes).
    Required with BROKER_WEBHOOK_URL. Never logged."""
    webhook_allow_http: bool = False
    """BROKER_WEBHOOK_ALLOW_HTTP: allow a plain-http webhook URL that is not loopback (inside a mesh with mTLS)."""
    webhook_timeout: float = 5.0
    """BROKER_WEBHOOK_TIMEOUT: each delivery attempt's timeout (seconds); a claim lasts this plus 5 s."""
    webhook_retry_period: float = 86400.0
    """BROKER_WEBHOOK_RETRY_PERIOD: how long an event is retried (exponential backoff with jitter, at most 5 minutes
    apart) before it is marked failed (seconds; default 24 hours)."""
    retention: float = 7 * 86400.0
    """BROKER_EVENT_RETENTION: how long events stay for WatchLinkEvents cursors (`7d`, `36h`, `90m` or seconds);
    events a webhook has still to deliver are kept whatever their age."""
    watchers: frozenset[str] = field(default_factory=frozenset)
    """BROKER_EVENT_WATCHERS: identities allowed to call WatchLinkEvents (the syntax of BROKER_ALLOWED_CALLERS);
    empty: nobody."""
    poll_interval: float = 0.5
    """BROKER_EVENT_POLL_INTERVAL: how often streams and webhook delivery look for new events (seconds)."""

    @property
    def webhook_enabled(self) -> bool:
        return self.webhook_url is not None and self.webhook_secret is not None


@dataclass(frozen=True)
class Settings:
    """Every knob of the broker. Field docs name the environment variable."""

    database_url: Secret | None
    """BROKER_DATABASE_URL or BROKER_DATABASE_URL_FILE: the DSN of the service's login role (postgresql://)."""
    migrate_database_url: Secret | None
    """BROKER_MIGRATE_DATABASE_URL or BROKER_MIGRATE_DATABASE_URL_FILE: an admin role's DSN for `migrate`."""
    encryption_keys: Secret | None = None
    """BROKER_ENCRYPTION_KEYS or BROKER_ENCRYPTION_KEYS_FILE: the Go product's external-token encryption keys, a
    comma-separated list of base64 32-byte keys, primary first (it encrypts; the others only decrypt). Never logged."""
    db_service_role: str = "token_broker"
    """BROKER_DB_SERVICE_ROLE: the login role `migrate` grants EXECUTE to (created if missing)."""
    db_pool_min: int = 1
    """BROKER_DB_POOL_MIN: connections the asyncpg pool of each worker keeps open."""
    db_pool_max: int = 10
    """BROKER_DB_POOL_MAX: connections per worker, at least 3 (DB_POOL_SMALLEST; a smaller pool is refused at
    start-up). Up to 2 are held for reads (1 below 6); a refresh holds one across the IdP call and briefly needs
    another for its in-flight marker; refreshes at once are at most half the pool, and at least one connection is
    always left for the short statements (pool_shares)."""
    db_statement_cache: bool = True
    """BROKER_DB_STATEMENT_CACHE: asyncpg's prepared-statement cache. Set false behind PgBouncer in transaction
    (or statement) pooling without prepared-statement support (1.20 and older, or max_prepared_statements = 0);
    left on there, the first prepared statement the pooler loses turns it off (one WARNING)."""
    listen: str = "127.0.0.1:50051"
    """BROKER_LISTEN: host:port of the gRPC server."""
    metrics_listen: str = "127.0.0.1:9464"
    """BROKER_METRICS_LISTEN: host:port of the Prometheus /metrics endpoint; empty disables it."""
    log_level: str = "INFO"
    """BROKER_LOG_LEVEL: DEBUG, INFO, WARNING, ERROR or CRITICAL (INFO writes one audit line per call)."""
    request_timeout: float = 10.0
    """BROKER_REQUEST_TIMEOUT: the most one RPC may take, also when the caller set no deadline (seconds)."""
    refresh_leeway: float = 600.0
    """BROKER_REFRESH_LEEWAY: refresh when now >= expiry - leeway (seconds; the Go product's value)."""
    refresh_ahead: float = 60.0
    """BROKER_REFRESH_AHEAD: serve and refresh in the background this long before the leeway window (0 = off)."""
    refresh_lock_timeout: float = 8.0
    """BROKER_REFRESH_LOCK_TIMEOUT: the most a refresh waits for the per-link lock held by another replica."""
    forced_refresh_interval: float = 30.0
    """BROKER_FORCED_REFRESH_INTERVAL: at most one refresh per link forced by an upstream's rejection in this many
    seconds; a rejection of the token it produced within it answers REAUTH_REQUIRED (seconds)."""
    reauth_backoff: float = 60.0
    """BROKER_REAUTH_BACKOFF: a rejected refresh token is not sent to the IdP again for this long (seconds)."""
    persist_retry_seconds: float = 30.0
    """BROKER_PERSIST_RETRY_SECONDS: how long a failed write-back of refreshed tokens is retried with backoff."""
    oidc_issuer: str | None = None
    """BROKER_OIDC_ISSUER: discovery via /.well-known/openid-configuration (cached for an hour); plain http only on
    loopback addresses."""
    oidc_token_url: str | None = None
    """BROKER_OIDC_TOKEN_URL: the token endpoint, skipping discovery."""
    oidc_client_id: str | None = None
    """BROKER_OIDC_CLIENT_ID: the broker's OAuth client id at the IdP."""
    oidc_client_secret: Secret | None = None
    """BROKER_OIDC_CLIENT_SECRET or BROKER_OIDC_CLIENT_SECRET_FILE: the OAuth client secret. Never logged."""
    oidc_auth_method: str = "client_secret_basic"
    """BROKER_OIDC_AUTH_METHOD: client_secret_basic or client_secret_post."""
    oidc_timeout: float = 5.0
    """BROKER_OIDC_TIMEOUT: every IdP call's timeout (seconds)."""
    circuit_failures: int = 5
    """BROKER_CIRCUIT_FAILURES: consecutive IdP outages that open the circuit."""
    circuit_open_seconds: float = 15.0
    """BROKER_CIRCUIT_OPEN_SECONDS: how long the circuit stays open before a probe."""
    health_interval: float = 5.0
    """BROKER_HEALTH_INTERVAL: how often readiness checks the database (seconds)."""
    drain_delay: float = 0.0
    """BROKER_DRAIN_DELAY: after SIGTERM, seconds of NOT_SERVING before the server stops accepting calls."""
    shutdown_grace: float = 10.0
    """BROKER_SHUTDOWN_GRACE: seconds in-flight RPCs get to finish at shutdown."""
    tls_cert_file: Path | None = None
    """BROKER_TLS_CERT_FILE: server certificate chain (PEM); with BROKER_TLS_KEY_FILE enables TLS."""
    tls_key_file: Path | None = None
    """BROKER_TLS_KEY_FILE: the server certificate's private key (PEM); both files are re-read when they change."""
    tls_client_ca_file: Path | None = None
    """BROKER_TLS_CLIENT_CA_FILE: require and verify client certificates issued by this CA (mutual TLS)."""
    allowed_callers: frozenset[str] = field(default_factory=frozenset)
    """BROKER_ALLOWED_CALLERS: comma-separated identities allowed to call, each with its kind: `uri:<URI SAN>`,
    `dns:<DNS SAN>` (client certificates) or `token:<name>` (caller tokens); a bare `scheme://...` means `uri:`."""
    caller_tokens_file: Path | None = None
    """BROKER_CALLER_TOKENS_FILE: lines `name:sha256-hex-of-token` for bearer caller authentication."""
    resources_file: Path | None = None
    """BROKER_RESOURCES_FILE: the resource policy, YAML or JSON (docs/audience-bound-tokens.md): which caller may get
    a token exchanged for which MCP server (`resource`, optional `audience` and `scope`, `callers`). Re-read when it
    changes (checked at most once a second); an edit that does not validate is logged and the policy in force stays."""
    passthrough: str = "allow"
    """BROKER_PASSTHROUGH: allow (a request without a resource gets the login token) or deny (PERMISSION_DENIED:
    every caller must name the MCP server, as the MCP authorization specification requires)."""
    trusted_proxy_identity: str = "none"
    """BROKER_TRUSTED_PROXY_IDENTITY: none, xfcc (Envoy/Istio's x-forwarded-client-cert) or l5d (Linkerd's
    l5d-client-id): the caller's identity as the local sidecar verified it, trusted only from
    BROKER_TRUSTED_PROXY_ADDRESSES. With a mode on, every call needs an identity."""
    workers: int = 0
    """BROKER_WORKERS: processes serving the one port (SO_REUSEPORT), each with its own pool, under one supervisor;
    `auto` or unset: the CPUs the container may use (its cgroup CPU quota, rounded up; else the CPU affinity), at
    most 8."""
    event_loop: str = "uvloop"
    """BROKER_EVENT_LOOP: uvloop (the default; falls back to asyncio if it is not installed) or asyncio."""
    worker_index: int | None = None
    """Set by the supervisor, not by operators (BROKER_WORKER_INDEX): this process is worker N of BROKER_WORKERS."""
    workers_dir: Path | None = None
    """Set by the supervisor (BROKER_WORKERS_DIR): where the workers share readiness and metrics."""
    trusted_proxy_addresses: tuple[str, ...] = DEFAULT_TRUSTED_PEERS
    """BROKER_TRUSTED_PROXY_ADDRESSES: the peers whose identity header is trusted (the local sidecar; Istio's inbound
    passthrough connects from 127.0.0.6)."""
    tracing: bool = False
    """OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SDK_DISABLED (the standard variables): OpenTelemetry
    traces are exported when they ask for an exporter; off otherwise, at no cost."""
    trace_user_id: bool = False
    """BROKER_TRACE_USER_ID: put the user id on the RPC's span (off: spans never carry a user id)."""
    allow_insecure: bool = False
    """BROKER_ALLOW_INSECURE: allow a non-loopback listen address without TLS or caller tokens."""
    max_concurrent_per_caller: int = 1024
    """BROKER_MAX_CONCURRENT_PER_CALLER: in-flight RPCs per caller identity before RESOURCE_EXHAUSTED."""
    max_request_bytes: int = 4096
    """BROKER_MAX_REQUEST_BYTES: the largest request message accepted."""
    health_listen: str = ""
    """BROKER_HEALTH_LISTEN: optional plaintext host:port serving only grpc.health.v1, for kubelet gRPC probes when
    the main port requires (mutual) TLS."""
    product_refresh_window: float = 600.0
    """BROKER_PRODUCT_REFRESH_WINDOW: the product refreshes a token itself when it expires within this many seconds
    (its build path); active users' tokens are refreshed in the background before that. 0: no background refresh."""
    active_window: float = 3600.0
    """BROKER_ACTIVE_WINDOW: a user whose token a caller asked for within this many seconds is active (background
    refresh); idle users are left alone, so their IdP sessions end by the IdP's idle policy."""
    background_jitter: float = 60.0
    """BROKER_BACKGROUND_JITTER: background refreshes run up to this many seconds earlier, per user, to spread them."""
    events: EventSettings = field(default_factory=EventSettings)
    """Link events: the BROKER_WEBHOOK_* and BROKER_EVENT_* settings."""

    @property
    def idp_configured(self) -> bool:
        return bool(self.oidc_client_id and (self.oidc_issuer or self.oidc_token_url))

    @property
    def listen_is_loopback(self) -> bool:
        host = self.listen.rsplit(":", 1)[0].strip("[]")
        return is_loopback_host(host)

    def require_database(self) -> None:
        """What `serve` needs beyond the settings' own checks (migrate and the client commands do not)."""
        if self.database_url is None:
            raise ConfigError("invalid configuration:\n  BROKER_DATABASE_URL or BROKER_DATABASE_URL_FILE: required")

    @property
    def authenticates_callers(self) -> bool:
        """TLS client certificates or caller tokens: what makes a non-loopback bind acceptable."""
        return self.tls_client_ca_file is not None or self.caller_tokens_file is not None

    @property
    def requires_identity(self) -> bool:
        """Every call must carry an identity (a certificate, a caller token, or the sidecar's header)."""
        return self.authenticates_callers or self.trusted_proxy_identity != "none"

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None and self.tls_key_file is not None

    @staticmethod
    def from_env(environ: Mapping[str, str]) -> Settings:
        return _read(EnvReader(environ))


def _read(r: EnvReader) -> Settings:
    database_url = r.secret("BROKER_DATABASE_URL")
    migrate_url = r.secret("BROKER_MIGRATE_DATABASE_URL") or database_url
    for label, dsn in (("BROKER_DATABASE_URL", database_url), ("BROKER_MIGRATE_DATABASE_URL", migrate_url)):
        if dsn is not None and urlsplit(dsn.reveal()).scheme not in ("postgres", "postgresql"):
            r.errors.append(f"{label}: must be a postgresql:// URL")
    role = r.raw("BROKER_DB_SERVICE_ROLE") or _D.db_service_role
    if not ROLE_NAME.fullmatch(role):
        r.errors.append("BROKER_DB_SERVICE_ROLE: must be a plain role name (letters, digits, _, at most 63)")
    issuer = r.raw("BROKER_OIDC_ISSUER")
    token_url = r.raw("BROKER_OIDC_TOKEN_URL")
    for name, url in (("BROKER_OIDC_ISSUER", issuer), ("BROKER_OIDC_TOKEN_URL", token_url)):
        if url and (problem := check_url(name, url)):
            r.errors.append(problem)
    client_id = r.raw("BROKER_OIDC_CLIENT_ID")
    client_secret = r.secret("BROKER_OIDC_CLIENT_SECRET")
    if (issuer or token_url) and not client_id:
        r.errors.append("BROKER_OIDC_CLIENT_ID: required when an issuer or token URL is set")
    if client_id and not (issuer or token_url):
        r.errors.append("BROKER_OIDC_ISSUER or BROKER_OIDC_TOKEN_URL: required with BROKER_OIDC_CLIENT_ID")
    auth_method = r.raw("BROKER_OIDC_AUTH_METHOD") or _D.oidc_auth_method
    if auth_method not in AUTH_METHODS:
        r.errors.append(f"BROKER_OIDC_AUTH_METHOD: must be one of {', '.join(AUTH_METHODS)}")
    if client_id and client_secret is None:
        r.errors.append("BROKER_OIDC_CLIENT_SECRET or BROKER_OIDC_CLIENT_SECRET_FILE: required")
    log_level = (r.raw("BROKER_LOG_LEVEL") or _D.log_level).upper()
    if log_level not in LOG_LEVELS:
        r.errors.append(f"BROKER_LOG_LEVEL: must be one of {', '.join(LOG_LEVELS)}")
    cert, key = r.file("BROKER_TLS_CERT_FILE"), r.file("BROKER_TLS_KEY_FILE")
    if (cert is None) != (key is None):
        r.errors.append("BROKER_TLS_CERT_FILE and BROKER_TLS_KEY_FILE: set both or neither")
    client_ca = r.file("BROKER_TLS_CLIENT_CA_FILE")
    if client_ca is not None and cert is None:
        r.errors.append("BROKER_TLS_CLIENT_CA_FILE: requires BROKER_TLS_CERT_FILE and BROKER_TLS_KEY_FILE")
    callers = r.callers("BROKER_ALLOWED_CALLERS")
    if client_ca is not None and not callers:
        r.errors.append("BROKER_ALLOWED_CALLERS: required with BROKER_TLS_CLIENT_CA_FILE (which SANs may call)")
    s = Settings(
        database_url=database_url,
        migrate_database_url=migrate_url,
        db_service_role=role,
        encryption_keys=_keys(r),
        db_pool_min=r.integer("BROKER_DB_POOL_MIN", _D.db_pool_min, 0, 1000),
        db_pool_max=_pool_max(r),
        db_statement_cache=r.boolean("BROKER_DB_STATEMENT_CACHE", _D.db_statement_cache),
        listen=r.address("BROKER_LISTEN", _D.listen),
        metrics_listen=r.address("BROKER_METRICS_LISTEN", _D.metrics_listen, allow_empty=True),
        log_level=log_level,
        request_timeout=r.seconds("BROKER_REQUEST_TIMEOUT", _D.request_timeout),
        refresh_leeway=r.seconds("BROKER_REFRESH_LEEWAY", _D.refresh_leeway, allow_zero=True),
        refresh_ahead=r.seconds("BROKER_REFRESH_AHEAD", _D.refresh_ahead, allow_zero=True),
        refresh_lock_timeout=r.seconds("BROKER_REFRESH_LOCK_TIMEOUT", _D.refresh_lock_timeout),
        forced_refresh_interval=r.seconds("BROKER_FORCED_REFRESH_INTERVAL", _D.forced_refresh_interval),
        reauth_backoff=r.seconds("BROKER_REAUTH_BACKOFF", _D.reauth_backoff, allow_zero=True),
        persist_retry_seconds=r.seconds("BROKER_PERSIST_RETRY_SECONDS", _D.persist_retry_seconds),
        oidc_issuer=issuer,
        oidc_token_url=token_url,
        oidc_client_id=client_id,
        oidc_client_secret=client_secret,
        oidc_auth_method=auth_method,
        oidc_timeout=r.seconds("BROKER_OIDC_TIMEOUT", _D.oidc_timeout),
        circuit_failures=r.integer("BROKER_CIRCUIT_FAILURES", _D.circuit_failures, 1, 10_000),
        circuit_open_seconds=r.seconds("BROKER_CIRCUIT_OPEN_SECONDS", _D.circuit_open_seconds),
        health_interval=r.seconds("BROKER_HEALTH_INTERVAL", _D.health_interval),
        drain_delay=r.seconds("BROKER_DRAIN_DELAY", _D.drain_delay, allow_zero=True),
        shutdown_grace=r.seconds("BROKER_SHUTDOWN_GRACE", _D.shutdown_grace, allow_zero=True),
        tls_cert_file=cert,
        tls_key_file=key,
        tls_client_ca_file=client_ca,
        allowed_callers=callers,
        caller_tokens_file=r.file("BROKER_CALLER_TOKENS_FILE"),
        resources_file=r.file("BROKER_RESOURCES_FILE"),
        passthrough=_passthrough(r),
        allow_insecure=r.boolean("BROKER_ALLOW_INSECURE", _D.allow_insecure),
        tracing=tracing_wanted(r.env),
        trace_user_id=r.boolean("BROKER_TRACE_USER_ID", _D.trace_user_id),
        trusted_proxy_identity=_proxy_mode(r),
        trusted_proxy_addresses=_proxy_addresses(r),
        max_concurrent_per_caller=r.integer(
            "BROKER_MAX_CONCURRENT_PER_CALLER", _D.max_concurrent_per_caller, 1, 100_000
        ),
        max_request_bytes=r.integer("BROKER_MAX_REQUEST_BYTES", _D.max_request_bytes, 64, 1 << 20),
        health_listen=r.address("BROKER_HEALTH_LISTEN", _D.health_listen, allow_empty=True),
        workers=_workers(r),
        event_loop=_event_loop(r),
        product_refresh_window=r.seconds("BROKER_PRODUCT_REFRESH_WINDOW", _D.product_refresh_window, allow_zero=True),
        active_window=r.seconds("BROKER_ACTIVE_WINDOW", _D.active_window),
        background_jitter=r.seconds("BROKER_BACKGROUND_JITTER", _D.background_jitter, allow_zero=True),
        worker_index=r.integer("BROKER_WORKER_INDEX", 0, 0, 1023) if r.raw("BROKER_WORKER_INDEX") else None,
        workers_dir=Path(d) if (d := r.raw("BROKER_WORKERS_DIR")) else None,
        events=_events(r),
    )
    if not s.listen_is_loopback and not s.authenticates_callers and not s.allow_insecure:
        r.errors.append(
            f"BROKER_LISTEN: refusing the non-loopback address {s.listen} without caller authentication: set "
            "BROKER_TLS_CLIENT_CA_FILE or BROKER_CALLER_TOKENS_FILE, or BROKER_ALLOW_INSECURE=true"
        )
    if s.resources_file is not None and not s.idp_configured:
        r.errors.append("BROKER_RESOURCES_FILE: needs an identity provider to exchange tokens (BROKER_OIDC_ISSUER ...)")
    if r.errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(r.errors))
    return s


def _pool_max(r: EnvReader) -> int:
    size = r.integer("BROKER_DB_POOL_MAX", _D.db_pool_max, 1, 1000)
    if size < DB_POOL_SMALLEST:
        r.errors.append(
            f"BROKER_DB_POOL_MAX: at least {DB_POOL_SMALLEST}, not {size} (a connection for reads, one for a refresh "
            "holding its row lock, and one for its in-flight marker and the readiness check)"
        )
    return size


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(r: EnvReader, name: str, default: float) -> float:
    text = r.raw(name)
    if text is None:
        return default
    m = _DURATION.fullmatch(text.strip().lower())
    if m is None or float(m.group(1)) <= 0:
        r.errors.append(f"{name}: must be a duration such as 7d, 36h, 90m or a number of seconds, not {text!r}")
        return default
    return float(m.group(1)) * _UNIT[m.group(2)]


def _events(r: EnvReader) -> EventSettings:
    d = EventSettings()
    url = r.raw("BROKER_WEBHOOK_URL")
    secret = r.secret("BROKER_WEBHOOK_SECRET")
    allow_http = r.boolean("BROKER_WEBHOOK_ALLOW_HTTP", d.webhook_allow_http)
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            r.errors.append("BROKER_WEBHOOK_URL: must be an https URL")
        elif parts.scheme == "http" and not allow_http and not is_loopback_host(parts.hostname):
            r.errors.append(
                "BROKER_WEBHOOK_URL: must be https (plain http only on loopback or with BROKER_WEBHOOK_ALLOW_HTTP)"
            )
        if secret is None:
            r.errors.append("BROKER_WEBHOOK_SECRET or BROKER_WEBHOOK_SECRET_FILE: required with BROKER_WEBHOOK_URL")
    if secret is not None and webhook_key(secret) is None:
        r.errors.append("BROKER_WEBHOOK_SECRET: must be whsec_ followed by base64 of 24 to 64 bytes")
    return EventSettings(
        webhook_url=url,
        webhook_secret=secret,
        webhook_allow_http=allow_http,
        webhook_timeout=r.seconds("BROKER_WEBHOOK_TIMEOUT", d.webhook_timeout),
        webhook_retry_period=r.seconds("BROKER_WEBHOOK_RETRY_PERIOD", d.webhook_retry_period),
        retention=_duration(r, "BROKER_EVENT_RETENTION", d.retention),
        watchers=r.callers("BROKER_EVENT_WATCHERS"),
        poll_interval=r.seconds("BROKER_EVENT_POLL_INTERVAL", d.poll_interval),
    )


def webhook_key(secret: Secret) -> bytes | None:
    """The HMAC key of a Standard Webhooks secret (`whsec_` + base64), or None when it is not one."""
    text = secret.reveal()
    if not text.startswith("whsec_"):
        return None
    try:
        encoded = text.removeprefix("whsec_")
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (ValueError, binascii.Error):
        return None
    return key if 24 <= len(key) <= 64 else None


def _workers(r: EnvReader) -> int:
    text = (r.raw("BROKER_WORKERS") or "auto").strip().lower()
    if text == "auto":
        return min(cpu_limit(), 8)
    return r.integer("BROKER_WORKERS", 1, 1, 64)


def cpu_limit(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: the cgroup CPU quota rounded up (v2 cpu.max, v1 cfs quota), at most the CPU
    affinity; the affinity alone without a quota."""
    cpus = len(os.sched_getaffinity(0))
    quota: float | None = None
    try:
        limit, period = (cgroup / "cpu.max").read_text().split()[:2]
        if limit != "max":
            quota = int(limit) / int(period)
    except (OSError, ValueError):
        try:
            q = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
            if q > 0:
                quota = q / int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            pass
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota - 0.01)))
    return max(1, min(cpus, 64))


def _event_loop(r: EnvReader) -> str:
    loop = (r.raw("BROKER_EVENT_LOOP") or _D.event_loop).lower()
    if loop not in ("uvloop", "asyncio"):
        r.errors.append("BROKER_EVENT_LOOP: must be uvloop or asyncio")
    return loop


def _passthrough(r: EnvReader) -> str:
    mode = (r.raw("BROKER_PASSTHROUGH") or _D.passthrough).lower()
    if mode not in ("allow", "deny"):
        r.errors.append("BROKER_PASSTHROUGH: must be allow or deny")
    return mode


def _proxy_mode(r: EnvReader) -> str:
    mode = (r.raw("BROKER_TRUSTED_PROXY_IDENTITY") or _D.trusted_proxy_identity).lower()
    if mode not in PROXY_IDENTITY_MODES:
        r.errors.append("BROKER_TRUSTED_PROXY_IDENTITY: must be none, xfcc or l5d")
    return mode


def _proxy_addresses(r: EnvReader) -> tuple[str, ...]:
    text = r.raw("BROKER_TRUSTED_PROXY_ADDRESSES")
    if text is None:
        return _D.trusted_proxy_addresses
    addresses = tuple(a.strip() for a in text.split(",") if a.strip())
    for a in addresses:
        try:
            if not ipaddress.ip_address(a).is_loopback:
                r.errors.append(f"BROKER_TRUSTED_PROXY_ADDRESSES: {a} is not a loopback address (the local sidecar)")
        except ValueError:
            r.errors.append(f"BROKER_TRUSTED_PROXY_ADDRESSES: {a!r} is not an IP address")
    return addresses


def _keys(r: EnvReader) -> Secret | None:
    keys = r.secret("BROKER_ENCRYPTION_KEYS")
    if keys is not None:
        from broker.postgres.dbcrypt import parse_keys  # only when configured: it loads `cryptography`

        try:
            parse_keys(keys.reveal())
        except ValueError as exc:
            r.errors.append(f"BROKER_ENCRYPTION_KEYS: {exc}")
    return keys


_D = Settings(database_url=None, migrate_database_url=None)  # the defaults, as written once in the dataclass


def process_environment() -> dict[str, str]:
    """A copy of this process's environment: the one place the package reads os.environ."""
    return dict(os.environ)


def client_target(environ: Mapping[str, str]) -> str:
    """Where `token-broker get` and `health` connect by default: this broker's BROKER_LISTEN."""
    return environ.get("BROKER_LISTEN") or _D.listen


@dataclass(frozen=True)
class DevSettings:
    """`token-broker dev`: where the embedded PostgreSQL lives when no database is configured."""

    database_configured: bool
    """(make run only) BROKER_DATABASE_URL or BROKER_DATABASE_URL_FILE is set: no embedded PostgreSQL."""
    port: int = 54329
    """(make run only) BROKER_DEV_DB_PORT."""
    data_dir: Path = Path(".data")
    """(make run only) BROKER_DEV_DATA."""
    service_role: str = _D.db_service_role
    """BROKER_DB_SERVICE_ROLE."""

    @staticmethod
    def from_env(environ: Mapping[str, str]) -> DevSettings:
        r = EnvReader(environ)
        dev = DevSettings(
            database_configured=bool(r.raw("BROKER_DATABASE_URL") or r.raw("BROKER_DATABASE_URL_FILE")),
            port=r.integer("BROKER_DEV_DB_PORT", 54329, 1, 65535),
            data_dir=Path(r.raw("BROKER_DEV_DATA") or ".data"),
            service_role=r.raw("BROKER_DB_SERVICE_ROLE") or _D.db_service_role,
        )
        if r.errors:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(r.errors))
        return dev
