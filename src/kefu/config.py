"""The one configuration object, and the only module that reads the environment.

Sources, later ones winning: built-in defaults < TOML config file < ``KEFU_*`` environment
variables < command-line flags. Every setting has one flat name (``max_frame_bytes``); in
the file it sits in its section (``[limits] max_frame_bytes = 65536``), in the environment
it is ``KEFU_MAX_FRAME_BYTES``, and on the command line ``--set max_frame_bytes=65536``
(the common ones have their own flags, e.g. ``--port``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import socket
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kefu.errors import ConfigError

log = logging.getLogger(__name__)

ENV_PREFIX = "KEFU_"
DEV_SECRET_FILE = "dev-jwt-secret"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Bounds on what one client or one node may use."""

    max_frame_bytes: int = 64 * 1024
    rate_per_second: float = 20.0
    rate_burst: int = 40
    rate_flood_factor: float = 3.0
    max_connections_per_user: int = 10
    max_connections: int = 20_000
    send_queue_frames: int = 1024
    send_queue_soft_frames: int = 256
    send_queue_bytes: int = 4 * 1024 * 1024
    max_page: int = 200
    max_body_chars: int = 8000


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Durations, in seconds."""

    auth_timeout: float = 10.0
    heartbeat_interval: float = 30.0
    heartbeat_misses: int = 3
    shutdown_grace: float = 10.0


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StoreSettings:
    """The embedded SQLite message store."""

    sqlite_synchronous: str = "FULL"
    commit_max_batch: int = 1000
    max_pending_writes: int = 5000
    writer: str = "process"
    read_threads: int = 2


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSettings:
    """Customer-service behaviour: routing, timers and defaults (durations in seconds)."""

    default_group: str = "general"
    default_capacity: int = 10
    max_capacity: int = 200
    agent_offline_grace: float = 60.0
    accept_timeout: float = 60.0
    reopen_window: float = 24 * 3600.0
    inactivity_warning: float = 10 * 60.0
    inactivity_close: float = 15 * 60.0
    queue_update_interval: float = 0.5
    sweep_interval: float = 1.0
    #: Conversations waiting in one group (live and left messages) past which new ones are
    #: refused with the retryable ``overloaded`` error.
    max_queued: int = 10_000


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class WebhookSettings:
    """Event delivery to HTTP receivers (see docs/operations.md)."""

    webhook_urls: tuple[str, ...] = ()
    webhook_secret: str = ""
    webhook_timeout: float = 5.0
    webhook_max_attempts: int = 8
    webhook_backoff_initial: float = 0.5
    webhook_backoff_max: float = 60.0
    webhook_queue_size: int = 10_000


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ClusterSettings:
    """Cluster mode: Redis for shared state, PostgreSQL as the system of record.

    Both URLs empty: the embedded single-node mode. ``database_url`` alone: the embedded
    node with PostgreSQL instead of SQLite.
    """

    #: ``redis://host:port/db`` for a standalone Redis, or a Redis Cluster seed list
    #: ``redis://host1:port1,host2:port2,...`` (any reachable seed finds the others).
    redis_url: str = ""
    #: ``postgresql://user@host:port/database``.
    database_url: str = ""
    pg_pool_min: int = 2
    pg_pool_max: int = 10
    pg_writers: int = 1
    #: A busy writer waits this long for more writes to share a commit (0: never waits).
    pg_commit_delay: float = 0.002
    #: A PostgreSQL statement unanswered this long fails (retryably).
    pg_command_timeout: float = 5.0
    #: The URL other nodes, ``kefu route`` and the admin API give for this node. Empty:
    #: ``http://HOST:PORT`` with the port actually bound (the machine's name when HOST is
    #: a wildcard address such as 0.0.0.0).
    advertise_url: str = ""
    #: This node's share of the ring (background work and the load balancer's hashing).
    node_weight: float = 1.0
    #: Ring points per node of weight 1.
    ring_vnodes: int = 100
    #: Membership heartbeat period and the expiry of a node that stopped beating.
    node_heartbeat: float = 2.0
    node_ttl: float = 6.0


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Everything a node needs, built once at start-up and passed down."""

    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("data")
    node_id: str = dataclasses.field(default_factory=socket.gethostname)
    jwt_secret: str = ""
    jwt_secret_source: str = "unset"
    log_level: str = "INFO"
    compression: bool = True
    compression_window_bits: int = 11
    compression_mem_level: int = 1
    allowed_origins: tuple[str, ...] = ()
    use_uvloop: bool = True
    limits: Limits = dataclasses.field(default_factory=Limits)
    timeouts: Timeouts = dataclasses.field(default_factory=Timeouts)
    store: StoreSettings = dataclasses.field(default_factory=StoreSettings)
    service: ServiceSettings = dataclasses.field(default_factory=ServiceSettings)
    webhooks: WebhookSettings = dataclasses.field(default_factory=WebhookSettings)
    cluster: ClusterSettings = dataclasses.field(default_factory=ClusterSettings)

    def replace(self, **changes: Any) -> Config:
        """A copy with flat-named settings changed (``max_frame_bytes=...`` works)."""
        return build_config(base=self, overrides=changes)


_SECTIONS: dict[str, type[Any]] = {
    "limits": Limits,
    "timeouts": Timeouts,
    "store": StoreSettings,
    "service": ServiceSettings,
    "webhooks": WebhookSettings,
    "cluster": ClusterSettings,
}


def _field_table() -> dict[str, tuple[str | None, Any]]:
    """Map every flat setting name to (section or None, its type)."""
    table: dict[str, tuple[str | None, Any]] = {}
    top_hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if f.name in _SECTIONS or f.name == "jwt_secret_source":
            continue
        table[f.name] = (None, top_hints[f.name])
    for section, cls in _SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            table[f.name] = (section, hints[f.name])
    return table


FIELDS = _field_table()


def _coerce(name: str, kind: Any, value: Any) -> Any:
    """Turn a value from a file, the environment or a flag into the field's type."""
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if kind is Path:
            return Path(value)
        if kind is str:
            if not isinstance(value, str):
                raise ValueError(value)
            return value
        if typing.get_origin(kind) is tuple:
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(str(v) for v in value)
        if isinstance(kind, types.UnionType):  # pragma: no cover - no such field yet
            return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name!r}: cannot use {value!r}") from exc
    raise ConfigError(f"setting {name!r} has unsupported type {kind!r}")  # pragma: no cover


def _validate(cfg: Config) -> None:
    lim, tmo = cfg.limits, cfg.timeouts
    checks = [
        (1 <= cfg.port <= 65535 or cfg.port == 0, "port must be 0..65535"),
        (9 <= cfg.compression_window_bits <= 15, "compression_window_bits must be 9..15"),
        (1 <= cfg.compression_mem_level <= 9, "compression_mem_level must be 1..9"),
        (lim.max_frame_bytes >= 1024, "max_frame_bytes must be at least 1024"),
        (lim.rate_per_second > 0 and lim.rate_burst >= 1, "rate limits must be positive"),
        (lim.rate_flood_factor >= 1, "rate_flood_factor must be at least 1"),
        (lim.max_connections_per_user >= 1, "max_connections_per_user must be positive"),
        (lim.max_connections >= 1, "max_connections must be positive"),
        (
            1 <= lim.send_queue_soft_frames <= lim.send_queue_frames,
            "need 1 <= send_queue_soft_frames <= send_queue_frames",
        ),
        (lim.max_page >= 1, "max_page must be positive"),
        (tmo.auth_timeout > 0, "auth_timeout must be positive"),
        (tmo.heartbeat_interval >= 0, "heartbeat_interval must be >= 0 (0 disables)"),
        (tmo.heartbeat_misses >= 1, "heartbeat_misses must be positive"),
        (
            cfg.store.sqlite_synchronous in ("FULL", "NORMAL", "EXTRA"),
            "sqlite_synchronous must be FULL, NORMAL or EXTRA",
        ),
        (cfg.store.commit_max_batch >= 1, "commit_max_batch must be positive"),
        (cfg.store.max_pending_writes >= 1, "max_pending_writes must be positive"),
        (cfg.store.writer in ("process", "thread"), "writer must be process or thread"),
        (cfg.store.read_threads >= 1, "read_threads must be positive"),
        (
            1 <= cfg.service.default_capacity <= cfg.service.max_capacity,
            "need 1 <= default_capacity <= max_capacity",
        ),
        (cfg.service.agent_offline_grace >= 0, "agent_offline_grace must be >= 0"),
        (cfg.service.accept_timeout >= 0, "accept_timeout must be >= 0 (0 disables)"),
        (cfg.service.reopen_window >= 0, "reopen_window must be >= 0"),
        (
            0 <= cfg.service.inactivity_warning <= cfg.service.inactivity_close,
            "need 0 <= inactivity_warning <= inactivity_close (0 disables)",
        ),
        (cfg.service.queue_update_interval >= 0, "queue_update_interval must be >= 0"),
        (cfg.service.sweep_interval > 0, "sweep_interval must be positive"),
        (
            not cfg.cluster.database_url
            or cfg.cluster.database_url.startswith(("postgresql://", "postgres://")),
            "database_url must be a postgresql:// URL",
        ),
        (
            not cfg.cluster.redis_url
            or cfg.cluster.redis_url.startswith(("redis://", "rediss://")),
            "redis_url must be a redis:// URL (a comma-separated seed list for Redis Cluster)",
        ),
        (
            1 <= cfg.cluster.pg_pool_min <= cfg.cluster.pg_pool_max,
            "need 1 <= pg_pool_min <= pg_pool_max",
        ),
        (cfg.cluster.pg_command_timeout > 0, "pg_command_timeout must be positive"),
        (
            0 <= cfg.cluster.pg_commit_delay <= 0.1,
            "pg_commit_delay must be between 0 and 0.1 seconds",
        ),
        (
            1 <= cfg.cluster.pg_writers < cfg.cluster.pg_pool_max,
            "need 1 <= pg_writers < pg_pool_max (reads need a connection too)",
        ),
        (cfg.cluster.node_weight > 0, "node_weight must be positive"),
        (cfg.cluster.ring_vnodes >= 1, "ring_vnodes must be positive"),
        (
            0 < cfg.cluster.node_heartbeat < cfg.cluster.node_ttl,
            "need 0 < node_heartbeat < node_ttl",
        ),
        (cfg.service.max_queued >= 1, "max_queued must be positive"),
        (
            all(u.startswith(("http://", "https://")) for u in cfg.webhooks.webhook_urls),
            "webhook_urls must be http:// or https:// URLs",
        ),
        (
            not cfg.webhooks.webhook_urls or bool(cfg.webhooks.webhook_secret),
            "webhook_urls need webhook_secret (KEFU_WEBHOOK_SECRET) to sign with",
        ),
        (cfg.webhooks.webhook_timeout > 0, "webhook_timeout must be positive"),
        (cfg.webhooks.webhook_max_attempts >= 1, "webhook_max_attempts must be positive"),
        (
            0 < cfg.webhooks.webhook_backoff_initial <= cfg.webhooks.webhook_backoff_max,
            "need 0 < webhook_backoff_initial <= webhook_backoff_max",
        ),
        (cfg.webhooks.webhook_queue_size >= 1, "webhook_queue_size must be positive"),
    ]
    for ok, why in checks:
        if not ok:
            raise ConfigError(why)


def build_config(
    *, base: Config | None = None, overrides: Mapping[str, Any] | None = None
) -> Config:
    """Apply flat-named overrides to ``base`` (defaults when None) and validate."""
    cfg = base or Config()
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    for name, value in (overrides or {}).items():
        if name not in FIELDS:
            raise ConfigError(f"unknown setting {name!r}")
        section, kind = FIELDS[name]
        coerced = _coerce(name, kind, value)
        if section is None:
            top[name] = coerced
        else:
            sections[section][name] = coerced
    for section, changes in sections.items():
        if changes:
            top[section] = dataclasses.replace(getattr(cfg, section), **changes)
    cfg = dataclasses.replace(cfg, **top)
    _validate(cfg)
    return cfg


#: Settings a running node takes without a restart (SIGHUP, or ``kefu config set``):
#: limits, timeouts, the customer-service settings, its ring weight, origins, log level.
#: Limits apply to connections made from then on (a connection keeps the rate bucket and
#: outbox bounds it started with); everything else applies at once.
HOT_SECTIONS = frozenset({"limits", "timeouts", "service"})
HOT_TOP = frozenset({"allowed_origins", "log_level"})
HOT_CLUSTER = frozenset({"node_weight"})


def is_hot(name: str) -> bool:
    """Whether setting ``name`` may change while the node runs."""
    if name not in FIELDS:
        return False
    section = FIELDS[name][0]
    if section is None:
        return name in HOT_TOP
    return section in HOT_SECTIONS or name in HOT_CLUSTER


def changed(old: Config, new: Config) -> list[str]:
    """The flat names of the settings that differ between two configs."""
    out = []
    for name, (section, _) in FIELDS.items():
        a = getattr(old if section is None else getattr(old, section), name)
        b = getattr(new if section is None else getattr(new, section), name)
        if a != b:
            out.append(name)
    return sorted(out)


def hot_merge(running: Config, wanted: Config) -> tuple[Config, list[str], list[str]]:
    """``running`` with the hot settings of ``wanted``: (config, applied, needs restart)."""
    diff = changed(running, wanted)
    hot = [n for n in diff if is_hot(n)]
    cold = [n for n in diff if not is_hot(n)]
    values = {}
    for name in hot:
        section = FIELDS[name][0]
        values[name] = getattr(wanted if section is None else getattr(wanted, section), name)
    return build_config(base=running, overrides=values), hot, cold


def advertised_url(cfg: Config, port: int) -> str:
    """How other nodes and tools reach a node listening on ``port``: ``advertise_url``,
    else ``http://HOST:PORT`` (the machine's name for a wildcard HOST)."""
    if cfg.cluster.advertise_url:
        return cfg.cluster.advertise_url
    host = cfg.host
    if host in ("", "0.0.0.0", "::"):
        host = socket.getfqdn()
    return f"http://{host}:{port}"


def read_file(path: Path) -> dict[str, Any]:
    """Flatten a TOML config file into flat-named settings."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table")
            for sub, subvalue in value.items():
                if FIELDS.get(sub, (None,))[0] != key:
                    raise ConfigError(f"unknown setting {key}.{sub}")
                flat[sub] = subvalue
        else:
            if key not in FIELDS or FIELDS[key][0] is not None:
                raise ConfigError(f"unknown setting {key!r} in {path}")
            flat[key] = value
    return flat


def read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """Collect ``KEFU_*`` variables that name a setting; others are ignored."""
    flat: dict[str, Any] = {}
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name in FIELDS:
                flat[name] = value
    return flat


def load(
    *,
    config_file: Path | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    resolve_secret: bool = True,
) -> Config:
    """Build the node's configuration: defaults < file < environment < flags.

    ``config_file`` may also come from ``KEFU_CONFIG``. When no JWT secret is configured
    a development secret is generated once and kept in ``data_dir`` (with a loud warning).
    """
    env = os.environ if environ is None else environ
    if config_file is None and env.get("KEFU_CONFIG"):
        config_file = Path(env["KEFU_CONFIG"])
    merged: dict[str, Any] = {}
    if config_file is not None:
        merged.update(read_file(config_file))
    merged.update(read_env(env))
    merged.update({k: v for k, v in (flags or {}).items() if v is not None})
    cfg = build_config(overrides=merged)
    if cfg.jwt_secret:
        source = "flag" if (flags or {}).get("jwt_secret") else "configured"
        cfg = dataclasses.replace(cfg, jwt_secret_source=source)
    elif resolve_secret:
        cfg = dataclasses.replace(cfg, jwt_secret=dev_secret(cfg.data_dir), jwt_secret_source="dev")
    return cfg


def dev_secret(data_dir: Path) -> str:
    """Return the development JWT secret kept in ``data_dir``, creating it once."""
    path = data_dir / DEV_SECRET_FILE
    try:
        existing = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first: use theirs
        return path.read_text(encoding="ascii").strip()
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(secret + "\n")
    return secret


def redact_url(url: str) -> str:
    """``url`` fit for logs and messages: the password masked as ``***``, the query and
    fragment dropped (either may carry a token or a password). Works on seed lists
    (``redis://:pw@h1:1,h2:2/0``), which urllib cannot parse."""
    head, sep, rest = url.partition("://")
    if not sep:
        return url
    rest = rest.split("?", 1)[0].split("#", 1)[0]
    userinfo, at, hosts = rest.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    return f"{head}://{userinfo}{at}{hosts}"
