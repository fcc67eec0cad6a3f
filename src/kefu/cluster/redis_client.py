"""Connecting to Redis, standalone or Redis Cluster, and the keys Kefu keeps there.

``redis_url`` is ``redis://host:port/db`` for a standalone server or a seed list
``redis://host1:port1,host2:port2,...`` for a Redis Cluster (any reachable seed finds the
others; a single seed that answers ``cluster_enabled:1`` is a cluster too).

Every key names what it holds, with the part that decides its Redis Cluster slot in
``{braces}`` (a hash tag), so that each Lua script and each multi-key command touches one
slot: a user's presence and offline inbox share the user's slot, a node incarnation's user
set its own.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

#: Seconds a Redis command may take before it fails (the caller's error path takes over).
SOCKET_TIMEOUT = 2.0
CONNECT_TIMEOUT = 1.0

RedisClient = aioredis.Redis | RedisCluster

#: Exceptions that mean "Redis is unreachable or failed this command".
#: (redis-py's RedisClusterException, raised when no seed answers, is not a RedisError.)
REDIS_ERRORS: tuple[type[BaseException], ...] = (
    RedisError,
    RedisClusterException,
    OSError,
    TimeoutError,
)


def text(value: bytes | str) -> str:
    """A Redis reply item as text (the clients return bytes)."""
    return value.decode() if isinstance(value, bytes) else value


# -- keys ---------------------------------------------------------------------------------------

#: ZSET of live node incarnations ("node_id/incarnation"), scored by expiry (ms).
MEMBERS = "kefu:members"


def member_info(member: str) -> str:
    """HASH of one incarnation: weight, url, started, connections."""
    return f"kefu:member:{{{member}}}"


def member_users(member: str) -> str:
    """SET of users with a connection on this incarnation (to purge it when it dies)."""
    return f"kefu:member-users:{{{member}}}"


def presence(user_id: str) -> str:
    """HASH connection id -> incarnation holding it."""
    return f"kefu:presence:{{{user_id}}}"


def inbox(user_id: str) -> str:
    """LIST of pushes kept for a user with no connection anywhere (drained on connect)."""
    return f"kefu:inbox:{{{user_id}}}"


def node_channel(node_id: str) -> str:
    """The node's inbox channel: pushes for its connections (sharded pub/sub on Cluster)."""
    return f"kefu:node:{{{node_id}}}"


#: Channel of cluster-wide announcements: ``desk`` (groups or agents saved), ``watch`` (a
#: supervisor's watch), ``config`` (runtime settings changed; see kefu.broker.Broker.announce).
SETTINGS_CHANNEL = "kefu:settings"
#: HASH of cluster-wide runtime settings (flat name -> value), set by ``kefu config set``.
SETTINGS = "kefu:runtime-settings"


# -- connecting ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class RedisTarget:
    seeds: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False


def parse_url(url: str) -> RedisTarget:
    """Seeds, database and credentials from a ``redis://`` URL or seed list."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("redis", "rediss"):
        raise ValueError(f"not a redis:// URL: {url!r}")
    userinfo, _, hosts = parsed.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, _, secret = userinfo.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(secret) or None
    seeds = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host:
            host, port = item.strip(), "6379"
        seeds.append((host.strip("[]"), int(port)))
    db = int(parsed.path.strip("/") or 0)
    return RedisTarget(tuple(seeds), db, username, password, parsed.scheme == "rediss")


def _options(target: RedisTarget) -> dict[str, Any]:
    return {
        "username": target.username,
        "password": target.password,
        "ssl": target.tls,
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        # A broken connection is retried once at once (a restarted server); the caller's
        # own loop backs off with jitter after that.
        "retry": Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.02), 1),
    }


def standalone(host: str, port: int, target: RedisTarget, **extra: Any) -> aioredis.Redis:
    return aioredis.Redis(host=host, port=port, db=target.db, **_options(target), **extra)


async def connect(url: str) -> tuple[RedisClient, bool]:
    """A client for ``url`` and whether it is a Redis Cluster; raises when unreachable."""
    target = parse_url(url)
    if len(target.seeds) == 1:
        host, port = target.seeds[0]
        client = standalone(host, port, target)
        try:
            info = await client.info("cluster")
        except BaseException:
            await client.aclose()
            raise
        if not info.get("cluster_enabled"):
            return client, False
        await client.aclose()
    cluster = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.seeds],
        **_options(target),
    )
    await cluster.initialize()
    return cluster, True
