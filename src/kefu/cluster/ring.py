"""The consistent-hash ring: which live node owns a key. Pure: no I/O, no clock.

One hash function, :func:`hash_key`, places both the ring's points and the keys looked up
on it: MurmurHash3_x86_32 with seed 0 over the key's UTF-8 bytes, read as an unsigned
integer in ``[0, 2**32)``. It is the 32-bit MurmurHash3 that every language has (Go
``murmur3.Sum32``, Java Guava ``murmur3_32_fixed``, Lua and C ports), so the access
layer's hook can compute exactly the same thing and pick the same home node.

A node of weight ``w`` gets ``max(1, round(vnodes * w))`` points (``vnodes`` defaults to
100; ``round`` is Python's, half to even), placed at ``hash_key(f"{node_id}#{i}")``. A key
belongs to the first point clockwise from its hash (the first point ``>= hash``, wrapping
past the top to the lowest point). Two points that hash to the same value (rare with a
thousand points in 2**32) are ordered by node id, so the tie is settled the same way
everywhere and the second point simply owns nothing.

A :class:`Ring` is immutable: a new membership is a new ring. Its :attr:`Ring.version`
fingerprints the membership, so every node that sees the same members agrees on the same
version without talking to the others.

Key conventions: a user's home node is ``ring.owner(user_id)`` (the bare id, which is what
the load balancer hashes); a partition of background work (queue dispatch per group,
inactivity sweeps, webhook delivery) is ``ring.owner_of_partition(kind, key)``, which hashes
:func:`partition_key` ``f"{kind}:{key}"``.

Balance with the default 100 points: a node's share of the keys has a relative standard
deviation of about 1/sqrt(points), 10%. The least and most loaded node of ``kefu-0`` ...
``kefu-{N-1}`` get 0.90-1.07 (N=3), 0.87-1.12 (N=5) and 0.81-1.18 (N=10) of the fair share
``1/N`` of 100,000 keys; over 2,000 random memberships the worst node strays by a median
9% / 13% / 17% and a 99th percentile 24% / 27% / 31% (N = 3 / 5 / 10). More points
tighten this as 1/sqrt: 400 points halve it. See tests/unit/test_ring.py.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType

import mmh3

from kefu.errors import KefuError

#: Points per node of weight 1.0.
DEFAULT_VNODES = 100
#: :func:`hash_key` returns an integer in ``[0, HASH_SPACE)``.
HASH_SPACE = 2**32
#: Names the point placement; part of every :attr:`Ring.version`, so a change to the hash
#: or the point labels can never be mistaken for the same ring.
SCHEME = "kefu-ring/1 mmh3_x86_32 seed=0 label={node}#{i}"

__all__ = [
    "DEFAULT_VNODES",
    "HASH_SPACE",
    "SCHEME",
    "EmptyRing",
    "Ring",
    "hash_key",
    "moved",
    "partition_key",
]


class EmptyRing(KefuError, LookupError):
    """A lookup on a ring with no nodes: there is no live node to own anything.

    Part of Kefu's tree (code ``internal``, retryable: nodes may join) and a
    :class:`LookupError`, like any lookup that finds nothing.
    """


def hash_key(key: str) -> int:
    """MurmurHash3_x86_32, seed 0, of ``key`` as UTF-8, unsigned: ``0 <= h < 2**32``.

    The only hash the ring uses, for its points and for keys alike. A ``str`` holding a
    lone surrogate has no UTF-8 form and raises :class:`UnicodeEncodeError` (a
    ``ValueError``). The key is encoded here, never by mmh3: mmh3 5.3.1 crashes the whole
    process (SIGSEGV) when handed such a ``str`` directly.
    """
    return mmh3.mmh3_32_uintdigest(key.encode("utf-8"))


def partition_key(kind: str, key: str) -> str:
    """The ring key of partition ``key`` of background work ``kind``: ``f"{kind}:{key}"``.

    ``kind`` must be non-empty and free of ``":"`` so two partitions never share a key.
    """
    if not kind or ":" in kind:
        raise ValueError(f"partition kind must be non-empty and contain no ':': {kind!r}")
    return f"{kind}:{key}"


def _points_for(weight: float, vnodes: int) -> int:
    return max(1, round(vnodes * weight))


class Ring:
    """A consistent-hash ring over ``weights`` (node id -> weight > 0).

    ``vnodes`` is the number of points of a node of weight 1.0. Lookups hash the key once
    and bisect a sorted list of points; the owners are a parallel list.
    """

    __slots__ = ("_key", "_owners", "_points", "_vnodes", "_weights", "version")

    version: str
    """16 hex digits fingerprinting the membership, equal in every process that sees the
    same members: BLAKE2b (8-byte digest) of the compact JSON
    ``[SCHEME, [[node_id, weight, points], ...]]``, sorted by node id, each weight written
    as Python writes a float."""

    def __init__(
        self, weights: Mapping[str, float] | None = None, *, vnodes: int = DEFAULT_VNODES
    ) -> None:
        if isinstance(vnodes, bool) or not isinstance(vnodes, int) or vnodes < 1:
            raise ValueError(f"vnodes must be an integer >= 1, got {vnodes!r}")
        members: list[tuple[str, float, int]] = []
        for node, weight in (weights or {}).items():
            if not isinstance(node, str) or not node:
                raise ValueError(f"node id must be a non-empty string, got {node!r}")
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise ValueError(f"weight of {node!r} must be a number, got {weight!r}")
            w = float(weight)
            if not (math.isfinite(w) and w > 0):
                raise ValueError(f"weight of {node!r} must be finite and > 0, got {weight!r}")
            members.append((node, w, _points_for(w, vnodes)))
        members.sort()

        placed = sorted(
            (hash_key(f"{node}#{i}"), node) for node, _, count in members for i in range(count)
        )
        self._points = [point for point, _ in placed]
        self._owners = [node for _, node in placed]
        self._vnodes = vnodes
        self._weights: Mapping[str, float] = MappingProxyType({n: w for n, w, _ in members})
        self._key = tuple(members)
        canonical = json.dumps([SCHEME, members], separators=(",", ":"))
        self.version = hashlib.blake2b(canonical.encode(), digest_size=8).hexdigest()

    # -- membership ---------------------------------------------------------------------

    @property
    def nodes(self) -> tuple[str, ...]:
        """The node ids, sorted."""
        return tuple(self._weights)

    @property
    def weights(self) -> Mapping[str, float]:
        """Node id -> weight (read-only)."""
        return self._weights

    @property
    def vnodes(self) -> int:
        """Points per node of weight 1.0."""
        return self._vnodes

    def points_of(self, node: str) -> int:
        """How many points ``node`` has on the ring (``KeyError`` if it is not a member)."""
        return _points_for(self._weights[node], self._vnodes)

    def __len__(self) -> int:
        return len(self._weights)

    def __contains__(self, node: object) -> bool:
        return node in self._weights

    def __iter__(self) -> Iterator[str]:
        return iter(self._weights)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ring):
            return NotImplemented
        return self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"Ring({dict(self._weights)!r}, vnodes={self._vnodes}) version={self.version}"

    # -- lookups -------------------------------------------------------------------------

    def _index(self, key: str) -> int:
        if not self._points:
            raise EmptyRing("the ring has no nodes")
        i = bisect.bisect_left(self._points, hash_key(key))
        return 0 if i == len(self._points) else i

    def owner(self, key: str) -> str:
        """The node owning ``key``: the first point clockwise from ``hash_key(key)``.

        Raises :class:`EmptyRing` when the ring has no nodes.
        """
        return self._owners[self._index(key)]

    def owners(self, key: str, n: int) -> tuple[str, ...]:
        """Up to ``n`` distinct nodes met walking clockwise from ``key``, owner first.

        Gives every node (in walk order) when ``n >= len(self)``; ``()`` when ``n == 0``.
        For replicas and fallbacks. Raises :class:`EmptyRing` when the ring has no nodes.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n == 0:
            return ()
        start = self._index(key)
        want = min(n, len(self._weights))
        found: dict[str, None] = {}  # insertion-ordered set
        size = len(self._owners)
        for step in range(size):
            found.setdefault(self._owners[(start + step) % size])
            if len(found) == want:
                break
        return tuple(found)

    def owner_of_partition(self, kind: str, key: str) -> str:
        """The node that runs partition ``key`` of background work ``kind``.

        ``owner(partition_key(kind, key))``; e.g. ``owner_of_partition("dispatch", group)``.
        """
        return self.owner(partition_key(kind, key))


def moved(old: Ring, new: Ring, keys: Iterable[str]) -> set[str]:
    """The keys among ``keys`` whose owner differs between ``old`` and ``new``."""
    return {key for key in keys if old.owner(key) != new.owner(key)}
