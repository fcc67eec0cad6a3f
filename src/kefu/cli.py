"""The ``kefu`` command: serve, token, migrate, route, cluster, version, bench."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kefu import __version__, config
from kefu.auth import issue_token
from kefu.errors import ConfigError

log = logging.getLogger("kefu")

DEV_SECRET_WARNING = """
************************************************************************
*  KEFU_JWT_SECRET is not set. Using a generated DEVELOPMENT secret     *
*  stored in {path:<56}*
*  Anyone who can read that file can sign tokens. Set KEFU_JWT_SECRET  *
*  (at least 32 random bytes) before exposing this node.               *
************************************************************************"""


def _parse_set(values: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects NAME=VALUE, got {item!r}")
        out[name.strip()] = value
    return out


def _settings(parser: argparse.ArgumentParser, whose: str = "") -> None:
    parser.add_argument("--config", type=Path, help=f"TOML config file (also KEFU_CONFIG){whose}")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=f"any setting by its flat name, e.g. --set rate_per_second=50{whose}",
    )


def _common(parser: argparse.ArgumentParser) -> None:
    _settings(parser)
    parser.add_argument("--data-dir", type=Path, help="data directory (default ./data)")


def _redis_url(parser: argparse.ArgumentParser, help: str = "") -> None:
    parser.add_argument(
        "--redis-url",
        metavar="URL",
        help=help
        or "Redis of the cluster: redis://host:port/db, or a Redis Cluster seed list "
        "redis://host1:port1,host2:port2 (setting redis_url)",
    )


def _database_url(parser: argparse.ArgumentParser, help: str = "") -> None:
    parser.add_argument(
        "--database-url",
        metavar="URL",
        help=help or "PostgreSQL: postgresql://user@host:port/database (setting database_url)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kefu", description="Kefu customer-service IM node")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a node")
    _common(serve)
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8080)")
    serve.add_argument("--node-id", help="this node's id (default: the host name)")
    _redis_url(serve)
    _database_url(serve)

    token = sub.add_parser("token", help="print a JWT signed with the node's secret")
    _common(token)
    token.add_argument("--user", required=True, help="user id (the token's subject)")
    token.add_argument("--role", required=True, choices=["customer", "agent", "admin"])
    token.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds")

    migrate = sub.add_parser(
        "migrate",
        help="apply the PostgreSQL schema migrations (nodes also do at start-up)",
        description="Apply the missing PostgreSQL schema migrations of this Kefu to "
        "database_url, each in its own transaction (nodes starting together wait for "
        "each other). Exit status 2 when no database is configured or reachable.",
    )
    _settings(migrate)
    _database_url(migrate)

    route = sub.add_parser(
        "route",
        help="print a user's home node",
        description="Read the live nodes from the cluster's Redis (without joining) and "
        "print the node that owns USER_ID on the consistent-hash ring, its URL and the "
        "ring version. Uses ring_vnodes from the same configuration as the nodes. Exit "
        "status 2 when Redis is unreachable or no node is live.",
    )
    route.add_argument("user_id", metavar="USER_ID", help="the user id (the bare id)")
    _settings(route)
    _redis_url(route)

    cfg_cmd = sub.add_parser(
        "config",
        help="change settings of every running node at once",
        description="Cluster-wide runtime settings, kept in the cluster's Redis and applied "
        "by every node at once (and by nodes that start later), on top of their own "
        "configuration. Only settings a running node can take are accepted (limits, "
        "timeouts, [service], node_weight, allowed_origins, log_level). One node alone: "
        "edit its config file and send it SIGHUP instead.",
    )
    cfg_cmd.add_argument("action", choices=["set", "unset", "show"])
    cfg_cmd.add_argument(
        "items", nargs="*", metavar="NAME[=VALUE]", help="set: NAME=VALUE...; unset: NAME..."
    )
    _settings(cfg_cmd)
    _redis_url(cfg_cmd)

    cluster = sub.add_parser(
        "cluster",
        help="run a local cluster: Redis, PostgreSQL and N nodes",
        description="A local cluster for development and trials, every process on "
        "127.0.0.1; its data, logs and pid files in one directory.",
    )
    csub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="{up,down}")
    up = csub.add_parser(
        "up",
        help="start redis-server, PostgreSQL and N nodes",
        description="Start a redis-server and a PostgreSQL (unless --redis-url / "
        "--database-url name existing ones) on free ports, apply the migrations, then N "
        "nodes node-0..node-(N-1) on consecutive ports from --base-port, sharing one JWT "
        "secret (the configured jwt_secret, e.g. KEFU_JWT_SECRET, else one generated "
        "into DIR/jwt-secret). Waits until every node answers /ready, then prints the "
        "URLs. The processes keep running: stop them with kefu cluster down.",
    )
    up.add_argument("--nodes", type=int, default=3, metavar="N", help="nodes (default 3)")
    up.add_argument(
        "--base-port", type=int, default=8080, metavar="P", help="node-0's port (default 8080)"
    )
    _redis_url(up, "use this Redis instead of starting a redis-server")
    _database_url(up, "use this PostgreSQL instead of starting one")
    up.add_argument(
        "--dir", type=Path, default=Path("cluster"), metavar="D", help="directory (./cluster)"
    )
    _settings(up, "; passed to every node")
    up.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long each server may take to become ready (default 60)",
    )
    down = csub.add_parser(
        "down",
        help="stop what kefu cluster up started",
        description="Stop the nodes (SIGTERM: graceful drain), then PostgreSQL and Redis "
        "if kefu cluster up started them; SIGKILL whatever is still running after the "
        "grace period. Data and logs stay in the directory.",
    )
    down.add_argument(
        "--dir", type=Path, default=Path("cluster"), metavar="D", help="directory (./cluster)"
    )
    down.add_argument(
        "--grace",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="time to stop before SIGKILL (default 20)",
    )

    sub.add_parser("version", help="print the version")

    bench = sub.add_parser("bench", help="load generator (see docs/benchmarks.md)", add_help=False)
    bench.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _load(args: argparse.Namespace, extra: dict[str, Any], *, secret: bool = True) -> config.Config:
    """The configuration of a command: defaults < file < environment < --set < flags.

    ``secret=False``: commands that sign nothing neither need nor create a JWT secret.
    """
    flags = _parse_set(args.set)
    flags.update({k: v for k, v in extra.items() if v is not None})
    if getattr(args, "data_dir", None) is not None:
        flags["data_dir"] = args.data_dir
    cfg = config.load(config_file=args.config, flags=flags, resolve_secret=secret)
    if cfg.jwt_secret_source == "dev":
        print(
            DEV_SECRET_WARNING.format(path=str(cfg.data_dir / config.DEV_SECRET_FILE)),
            file=sys.stderr,
        )
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from kefu.bench.cli import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "version":
            print(f"kefu {__version__}")
            return 0
        if args.command == "token":
            cfg = _load(args, {})
            print(issue_token(cfg.jwt_secret, args.user, args.role, ttl=args.ttl))
            return 0
        if args.command == "migrate":
            return migrate(_load(args, {"database_url": args.database_url}, secret=False))
        if args.command == "route":
            return route(_load(args, {"redis_url": args.redis_url}, secret=False), args.user_id)
        if args.command == "cluster":
            return cluster(args)
        if args.command == "config":
            cfg = _load(args, {"redis_url": args.redis_url}, secret=False)
            return runtime_config(cfg, args.action, args.items)
        extra = {
            "host": args.host,
            "port": args.port,
            "node_id": args.node_id,
            "redis_url": args.redis_url,
            "database_url": args.database_url,
        }
        cfg = _load(args, extra)
    except ConfigError as exc:
        print(f"kefu: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run(cfg, reload=lambda: _load(args, extra))
    return 0


def run(cfg: config.Config, reload: Callable[[], config.Config] | None = None) -> None:
    from kefu.server import serve

    if cfg.use_uvloop:
        import uvloop

        uvloop.run(serve(cfg, reload=reload))
    else:
        asyncio.run(serve(cfg, reload=reload))


def _fail(message: str) -> int:
    print(f"kefu: {message}", file=sys.stderr)
    return 2


# -- kefu migrate ---------------------------------------------------------------------------


class DatabaseUnavailable(Exception):
    """The database cannot be reached, refused the connection or is too new."""


async def migrate_database(url: str, *, timeout: float = 5.0) -> tuple[list[int], int]:
    """Apply the missing migrations to ``url``: (the versions applied, the version now)."""
    from kefu.store import pg_schema

    try:
        return await pg_schema.migrate_url(url, timeout=timeout)
    except pg_schema.MigrationFailed as exc:
        raise DatabaseUnavailable(f"{config.redact_url(url)}: {exc}") from exc


def migrate(cfg: config.Config) -> int:
    """``kefu migrate``: apply the PostgreSQL migrations and say what was done."""
    from kefu.store.pg_schema import migrations

    url = cfg.cluster.database_url
    if not url:
        return _fail(
            "migrate: no database configured: give --database-url, KEFU_DATABASE_URL or "
            "[cluster] database_url"
        )
    try:
        applied, version = asyncio.run(
            migrate_database(url, timeout=cfg.cluster.pg_command_timeout)
        )
    except DatabaseUnavailable as exc:
        return _fail(f"migrate: {exc}")
    names = {m.version: m.name for m in migrations()}
    for number in applied:
        print(f"applied migration {number:04d}_{names.get(number, '?')}")
    print(f"schema is current (version {version})")
    return 0


# -- kefu route -----------------------------------------------------------------------------


async def _home(url: str, user_id: str, vnodes: int) -> list[tuple[str, str]] | str:
    """The lines ``kefu route`` prints, or the reason there are none."""
    from redis.exceptions import RedisClusterException

    from kefu.cluster import redis_client as rc
    from kefu.cluster.view import live_members, nodes_of, ring_of

    # RedisClusterException (no seed answers) is no RedisError: not in REDIS_ERRORS.
    unreachable: tuple[type[BaseException], ...] = (
        *rc.REDIS_ERRORS,
        RedisClusterException,
        ValueError,  # a malformed URL
    )
    try:
        client, _ = await rc.connect(url)
    except unreachable as exc:
        return f"cannot reach Redis at {config.redact_url(url)}: {exc or type(exc).__name__}"
    try:
        members = await live_members(client)
    except rc.REDIS_ERRORS as exc:
        return f"cannot read the members from Redis at {config.redact_url(url)}: {exc}"
    finally:
        await client.aclose()
    nodes = nodes_of(members)
    if not nodes:
        return f"no live node in the cluster (Redis at {config.redact_url(url)} lists none)"
    ring = ring_of(members, vnodes)
    home = nodes[ring.owner(user_id)]
    return [
        ("user", user_id),
        ("node", home.node),
        ("url", home.url),
        ("incarnation", home.incarnation),
        ("ring_version", ring.version),
        ("nodes", ", ".join(ring.nodes)),
    ]


def route(cfg: config.Config, user_id: str) -> int:
    """``kefu route USER_ID``: the user's home node as the live ring says."""
    url = cfg.cluster.redis_url
    if not url:
        return _fail(
            "route: no Redis configured: give --redis-url, KEFU_REDIS_URL or [cluster] redis_url"
        )
    answer = asyncio.run(_home(url, user_id, cfg.cluster.ring_vnodes))
    if isinstance(answer, str):
        return _fail(f"route: {answer}")
    for key, value in answer:
        print(f"{key}: {value}")
    return 0


# -- kefu config ---------------------------------------------------------------------------


def runtime_config(cfg: config.Config, action: str, items: Sequence[str]) -> int:
    """``kefu config set|unset|show``: the cluster-wide runtime settings."""
    url = cfg.cluster.redis_url
    if not url:
        return _fail("config: no Redis configured: give --redis-url or KEFU_REDIS_URL")
    values: dict[str, str] = {}
    names: list[str] = []
    if action == "set":
        for item in items:
            name, sep, value = item.partition("=")
            if not sep:
                return _fail(f"config set: expected NAME=VALUE, got {item!r}")
            values[name.strip()] = value
        names = list(values)
    elif action == "unset":
        names = list(items)
    for name in names:
        if not config.is_hot(name):
            what = "unknown setting" if name not in config.FIELDS else "not a runtime setting"
            return _fail(f"config: {name!r}: {what} (restart the nodes to change it)")
    if values:
        config.build_config(base=cfg, overrides=values)  # refuse bad values here, not on nodes
    answer = asyncio.run(_runtime_config(url, action, values, names))
    if isinstance(answer, str):
        return _fail(f"config: {answer}")
    for name, value in sorted(answer.items()):
        print(f"{name} = {value}")
    return 0


async def _runtime_config(
    url: str, action: str, values: dict[str, str], names: list[str]
) -> dict[str, str] | str:
    from kefu.cluster import redis_client as rc
    from kefu.cluster.broker import announcement, read_settings

    try:
        client, _ = await rc.connect(url)
    except rc.REDIS_ERRORS as exc:
        return f"cannot reach Redis at {config.redact_url(url)}: {exc}"
    try:
        if action == "set" and values:
            await client.hset(rc.SETTINGS, mapping=dict[Any, Any](values))
        elif action == "unset" and names:
            await client.hdel(rc.SETTINGS, *names)
        if action != "show":
            await client.publish(rc.SETTINGS_CHANNEL, announcement("config", "kefu-config"))
        return await read_settings(client)
    except rc.REDIS_ERRORS as exc:
        return f"Redis failed: {exc}"
    finally:
        await client.aclose()


# -- kefu cluster ---------------------------------------------------------------------------


def cluster(args: argparse.Namespace) -> int:
    """``kefu cluster up`` / ``kefu cluster down``: a local cluster (kefu.cluster.local)."""
    from kefu.cluster import local

    if args.cluster_command == "down":
        return local.down(args.dir, grace=args.grace)
    if not 1 <= args.nodes <= 100:
        raise ConfigError("--nodes must be 1..100")
    if not 1 <= args.base_port <= 65536 - args.nodes:
        raise ConfigError(
            f"--base-port: ports {args.base_port}..+{args.nodes - 1} must fit 1..65535"
        )
    if args.timeout <= 0:
        raise ConfigError("--timeout must be positive")
    # The nodes get the same file, environment and --set: check them before starting
    # anything (and learn the heartbeat, to wait for the members to see each other).
    flags = _parse_set(args.set)
    flags.update(
        {k: v for k, v in (("redis_url", args.redis_url), ("database_url", args.database_url)) if v}
    )
    cfg = config.load(config_file=args.config, flags=flags, resolve_secret=False)
    return local.up(
        local.Plan(
            directory=args.dir,
            nodes=args.nodes,
            base_port=args.base_port,
            redis_url=args.redis_url or "",
            database_url=args.database_url or "",
            config_file=args.config,
            settings=tuple(args.set),
            timeout=args.timeout,
            heartbeat=cfg.cluster.node_heartbeat,
            jwt_secret=cfg.jwt_secret,
        )
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
