"""A read-only view of the cluster's membership, as any Redis client can see it.

What :class:`~kefu.cluster.membership.Membership` writes, read back without joining: the
live incarnations of ``kefu:members`` (scored by expiry, in ms) and their info hashes
(``node``, ``weight``, ``url``, ``started``, ``connections``), reduced to the newest
incarnation of each node id, and the :class:`~kefu.cluster.ring.Ring` over them. A process
that reads the same members as the nodes builds the same ring, with the same version, so
``kefu route`` names the home node the cluster itself uses.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from kefu import ids
from kefu.cluster import redis_client as rc
from kefu.cluster.ring import DEFAULT_VNODES, Ring

__all__ = ["NodeInfo", "live_members", "node_info", "node_of", "nodes_of", "ring_of"]


def node_of(member: str) -> str:
    """The node id of an incarnation ``node_id/random``."""
    return member.rpartition("/")[0] or member


@dataclasses.dataclass(frozen=True, slots=True)
class NodeInfo:
    """One live incarnation, its info hash parsed (missing or garbled fields defaulted)."""

    node: str
    incarnation: str
    weight: float
    url: str
    #: Unix ms when the incarnation started (0: unknown).
    started: int
    #: Its authenticated connections as of its last heartbeat.
    connections: int


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _weight(value: str | None, default: float) -> float:
    try:
        weight = float(value) if value is not None else default
    except ValueError:
        return default
    return weight if math.isfinite(weight) and weight > 0 else default


def node_info(member: str, info: Mapping[str, str], *, default_weight: float = 1.0) -> NodeInfo:
    """Parse the info hash of incarnation ``member``."""
    return NodeInfo(
        node=node_of(member),
        incarnation=member,
        weight=_weight(info.get("weight"), default_weight),
        url=info.get("url", ""),
        started=_int(info.get("started")),
        connections=_int(info.get("connections")),
    )


async def live_members(
    client: rc.RedisClient, *, now_ms: int | None = None
) -> dict[str, dict[str, str]]:
    """The live incarnations (expiry score >= now) and their info hashes, as text.

    Reads only: no entry is written, renewed or purged. Sorted by incarnation. An
    incarnation whose hash is gone (it expired meanwhile) maps to an empty dict.
    """
    now = ids.now_ms() if now_ms is None else now_ms
    raw = await client.zrangebyscore(rc.MEMBERS, now, "+inf")
    live = sorted(rc.text(m) for m in raw if isinstance(m, bytes | str))
    if not live:
        return {}
    pipe = client.pipeline(transaction=False)
    for member in live:
        pipe.hgetall(rc.member_info(member))
    infos = await pipe.execute()
    return {
        member: {rc.text(k): rc.text(v) for k, v in info.items()}
        for member, info in zip(live, infos, strict=True)
    }


def nodes_of(
    members: Mapping[str, Mapping[str, str]], *, default_weight: float = 1.0
) -> dict[str, NodeInfo]:
    """Node id -> its newest live incarnation, sorted by node id.

    A node restarted under the same id has two entries until the old one expires; the
    one that started last counts (ties: the greater incarnation id), as in membership.
    """
    newest: dict[str, NodeInfo] = {}
    for member, info in members.items():
        parsed = node_info(member, info, default_weight=default_weight)
        held = newest.get(parsed.node)
        if held is None or (parsed.started, parsed.incarnation) > (
            held.started,
            held.incarnation,
        ):
            newest[parsed.node] = parsed
    return dict(sorted(newest.items()))


def ring_of(
    members: Mapping[str, Mapping[str, str]],
    vnodes: int = DEFAULT_VNODES,
    *,
    default_weight: float = 1.0,
) -> Ring:
    """The ring over ``members`` (incarnation -> info hash, as :func:`live_members` gives):
    node id -> weight of each node's newest incarnation, ``vnodes`` points per weight 1."""
    nodes = nodes_of(members, default_weight=default_weight)
    return Ring({node: info.weight for node, info in nodes.items()}, vnodes=vnodes)
