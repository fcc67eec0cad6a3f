"""The consistent-hash ring: spread, minimal movement, determinism, validation.

Spread bounds. With 100 points per node a node's share of the ring has a relative standard
deviation of about 1/sqrt(100) = 10%, so the worst of N nodes strays further as N grows.
Measured exactly (arc lengths, no key sampling) over 2,000 random memberships, the worst
node's deviation from the fair share 1/N was: N=3 median 9%, p99 24%; N=5 median 13%,
p99 27%; N=10 median 17%, p99 31%. The memberships below (``kefu-0`` ... ``kefu-9``,
100,000 keys) measure 0.90-1.07 (N=3), 0.87-1.12 (N=5) and 0.81-1.18 (N=10) of the fair
share. ``SPREAD`` = ±35% holds for those with a wide margin and for about 99.5% of any
memberships, so renaming nodes or keys does not make the test flaky, while a broken
placement (one point per node: ~100% deviation) fails it at once.

The weighted check compares five nodes of weight 2 with five of weight 1 as groups (1,000
points against 500): over 2,000 random memberships the ratio stayed within 1.63-2.45 (p1
1.75, p99 2.28). A single pair is too noisy for a tight bound (p1 1.49, p99 2.65), so for
single nodes the test checks the exact point counts instead.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kefu.cluster.ring import (
    DEFAULT_VNODES,
    HASH_SPACE,
    SCHEME,
    EmptyRing,
    Ring,
    hash_key,
    moved,
    partition_key,
)
from kefu.errors import KefuError

KEYS = [f"user-{i}" for i in range(100_000)]
#: Allowed relative deviation of a node's share from its fair share (see module docstring).
SPREAD = 0.35


def names(n: int) -> list[str]:
    return [f"kefu-{i}" for i in range(n)]


def equal(nodes: list[str]) -> Ring:
    return Ring(dict.fromkeys(nodes, 1.0))


@functools.cache
def owners_of_keys(ring: Ring) -> list[str]:
    """``ring.owner(k)`` for every k in KEYS, computed once per membership."""
    return list(map(ring.owner, KEYS))


def reference_owner(ring: Ring) -> Callable[[str], str]:
    """The owner by definition: the lowest point >= hash(key), else the lowest point."""
    points = sorted(
        (hash_key(f"{node}#{i}"), node) for node in ring.nodes for i in range(ring.points_of(node))
    )

    def owner(key: str) -> str:
        h = hash_key(key)
        return min((p for p in points if p[0] >= h), default=points[0])[1]

    return owner


# -- the hash ---------------------------------------------------------------------------


def test_hash_key_is_murmur3_x86_32_unsigned() -> None:
    # Published MurmurHash3_x86_32 vectors (seed 0); the access layer must match these.
    assert hash_key("") == 0
    assert hash_key("hello") == 613153351
    assert hash_key("foo") == 4138058784  # -156908512 as a signed int
    assert hash_key("é") == hash_key("é")  # UTF-8 bytes c3 a9
    assert all(0 <= hash_key(k) < HASH_SPACE for k in KEYS[:1000])


def test_hash_key_rejects_lone_surrogates_without_crashing() -> None:
    with pytest.raises(UnicodeEncodeError):
        hash_key("user-\ud800")


# -- spread -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 5, 10])
def test_equal_weights_spread_evenly(n: int) -> None:
    ring = equal(names(n))
    counts = Counter(owners_of_keys(ring))
    assert set(counts) == set(ring.nodes)
    shares = [counts[node] * n / len(KEYS) for node in ring.nodes]
    assert min(shares) > 1 - SPREAD, shares
    assert max(shares) < 1 + SPREAD, shares


def test_weight_two_gets_about_twice_the_keys() -> None:
    heavy, light = names(10)[:5], names(10)[5:]
    ring = Ring({**dict.fromkeys(heavy, 2.0), **dict.fromkeys(light, 1.0)})
    counts = Counter(map(ring.owner, KEYS))
    ratio = sum(counts[n] for n in heavy) / sum(counts[n] for n in light)
    assert 1.6 < ratio < 2.4, ratio


@pytest.mark.parametrize(
    ("weight", "points"),
    [(1.0, 100), (2.0, 200), (1.5, 150), (0.25, 25), (0.125, 12), (0.001, 1), (1, 100)],
)
def test_points_per_weight(weight: float, points: int) -> None:
    ring = Ring({"a": weight, "b": 1.0})
    assert ring.points_of("a") == points  # max(1, round(100 * w)), half to even
    assert ring.points_of("b") == DEFAULT_VNODES


def test_vnodes_is_points_per_unit_weight() -> None:
    ring = Ring({"a": 1.0, "b": 0.5}, vnodes=10)
    assert (ring.vnodes, ring.points_of("a"), ring.points_of("b")) == (10, 10, 5)


# -- movement ---------------------------------------------------------------------------


def shifted_keys(old: Ring, new: Ring) -> list[tuple[str, str]]:
    """(owner before, owner after) for every key in KEYS whose owner changed."""
    pairs = zip(owners_of_keys(old), owners_of_keys(new), strict=True)
    return [(before, after) for before, after in pairs if before != after]


@pytest.mark.parametrize("n", [3, 5, 10])
def test_adding_a_node_moves_only_keys_to_it(n: int) -> None:
    old, new = equal(names(n)), equal(names(n + 1))
    newcomer = f"kefu-{n}"
    shifted = shifted_keys(old, new)
    assert {after for _, after in shifted} == {newcomer}
    assert len(shifted) == owners_of_keys(new).count(newcomer)  # all its keys are moved ones
    fraction = len(shifted) / len(KEYS)
    assert abs(fraction * (n + 1) - 1) < SPREAD, fraction


@pytest.mark.parametrize("n", [3, 5, 10])
def test_removing_a_node_moves_only_its_keys(n: int) -> None:
    old = equal(names(n))
    gone = "kefu-1"
    new = equal([node for node in names(n) if node != gone])
    shifted = shifted_keys(old, new)
    assert {before for before, _ in shifted} == {gone}
    assert len(shifted) == owners_of_keys(old).count(gone)  # every one of its keys moved
    fraction = len(shifted) / len(KEYS)
    assert abs(fraction * n - 1) < SPREAD, fraction


def test_changing_a_weight_moves_keys_only_to_or_from_that_node() -> None:
    old = equal(names(5))
    new = Ring({**dict.fromkeys(names(5), 1.0), "kefu-2": 2.0})
    shifted = moved(old, new, KEYS[:20_000])
    assert shifted
    assert {new.owner(key) for key in shifted} == {"kefu-2"}
    assert moved(old, Ring(dict.fromkeys(reversed(names(5)), 1)), KEYS[:20_000]) == set()


# -- determinism and version ------------------------------------------------------------


def test_insertion_order_does_not_matter() -> None:
    weights = {"kefu-0": 1.0, "kefu-1": 2.0, "kefu-2": 0.5, "kefu-3": 1.0}
    a = Ring(weights)
    b = Ring(dict(reversed(weights.items())))
    assert a == b and hash(a) == hash(b)
    assert a.version == b.version
    assert a.nodes == b.nodes == ("kefu-0", "kefu-1", "kefu-2", "kefu-3")
    assert [a.owner(k) for k in KEYS[:5000]] == [b.owner(k) for k in KEYS[:5000]]


def test_version_is_pinned() -> None:
    # Every process and every release must agree: changing this is a cluster-wide change.
    assert Ring({"kefu-0": 1.0, "kefu-1": 2.0}).version == "0f4ea6a04d36b3a4"
    assert Ring({"kefu-1": 2, "kefu-0": 1}).version == "0f4ea6a04d36b3a4"
    assert Ring().version == "37f03491fa8cb007"


def test_different_membership_different_version() -> None:
    base = {"kefu-0": 1.0, "kefu-1": 1.0}
    versions = {
        Ring(base).version,
        Ring({**base, "kefu-2": 1.0}).version,
        Ring({"kefu-0": 1.0}).version,
        Ring({**base, "kefu-1": 1.5}).version,
        Ring(base, vnodes=50).version,
        Ring({"kefu-0": 1.0, "kefu-2": 1.0}).version,
        Ring().version,
    }
    assert len(versions) == 7
    assert all(len(v) == 16 and int(v, 16) >= 0 for v in versions)


def test_colliding_points_are_settled_by_node_id() -> None:
    # Found by search: two labels with the same 32-bit hash.
    assert hash_key("kefu-459#95") == hash_key("kefu-975#85")
    a = Ring({"kefu-459": 1.0, "kefu-975": 1.0})
    b = Ring({"kefu-975": 1.0, "kefu-459": 1.0})
    key = "kefu-459#95"  # hashes exactly onto the shared point
    assert a.owner(key) == b.owner(key) == "kefu-459"
    assert a.owners(key, 2) == ("kefu-459", "kefu-975")
    assert Ring({"kefu-975": 1.0}).owner(key) == "kefu-975"


def test_wraps_past_the_highest_point() -> None:
    ring = Ring({"a": 1.0, "b": 1.0, "c": 1.0}, vnodes=3)
    points = sorted((hash_key(f"{n}#{i}"), n) for n in "abc" for i in range(3))
    # A key hashing above every point belongs to the lowest point.
    above = next(k for k in (f"k{i}" for i in range(100_000)) if hash_key(k) > points[-1][0])
    assert ring.owner(above) == points[0][1]


# -- owners -----------------------------------------------------------------------------


def test_owners_are_distinct_and_start_with_the_owner() -> None:
    ring = equal(names(5))
    for key in KEYS[:2000]:
        three = ring.owners(key, 3)
        assert len(three) == len(set(three)) == 3
        assert three[0] == ring.owner(key)
        assert ring.owners(key, 1) == (ring.owner(key),)
        everyone = ring.owners(key, 99)
        assert sorted(everyone) == list(ring.nodes)
        assert everyone[:3] == three
    assert ring.owners("x", 0) == ()
    with pytest.raises(ValueError, match="n must be"):
        ring.owners("x", -1)


# -- membership and errors --------------------------------------------------------------


def test_membership_views() -> None:
    ring = Ring({"b": 2.0, "a": 1})
    assert len(ring) == 2
    assert ring.nodes == ("a", "b") == tuple(ring)
    assert dict(ring.weights) == {"a": 1.0, "b": 2.0}
    assert "a" in ring and "z" not in ring
    with pytest.raises(TypeError):
        ring.weights["c"] = 1.0  # type: ignore[index]
    assert ring != Ring({"a": 1.0})
    assert "version=" in repr(ring)


def test_empty_ring_raises_empty_ring() -> None:
    ring = Ring()
    assert len(ring) == 0 and ring.nodes == ()
    with pytest.raises(EmptyRing):
        ring.owner("user-1")
    with pytest.raises(EmptyRing):
        ring.owners("user-1", 2)
    with pytest.raises(EmptyRing):
        ring.owner_of_partition("dispatch", "g1")
    assert issubclass(EmptyRing, LookupError) and issubclass(EmptyRing, KefuError)
    assert EmptyRing("no nodes").retryable


@pytest.mark.parametrize("weight", [0, 0.0, -1.0, float("nan"), float("inf"), True, "1"])
def test_bad_weights_raise(weight: object) -> None:
    with pytest.raises(ValueError, match="weight"):
        Ring({"a": weight})  # type: ignore[dict-item]


@pytest.mark.parametrize("vnodes", [0, -5, 1.5, True])
def test_bad_vnodes_raise(vnodes: object) -> None:
    with pytest.raises(ValueError, match="vnodes"):
        Ring({"a": 1.0}, vnodes=vnodes)  # type: ignore[arg-type]


def test_empty_node_id_raises() -> None:
    with pytest.raises(ValueError, match="node id"):
        Ring({"": 1.0})


def test_node_ids_with_hash_signs_do_not_share_labels() -> None:
    # "a#1" point 0 is "a#1#0"; "a" point 10 is "a#10": labels stay unique.
    ring = Ring({"a": 1.0, "a#1": 1.0})
    assert Counter(map(ring.owner, KEYS[:5000])).keys() == {"a", "a#1"}


# -- partitions -------------------------------------------------------------------------


def test_partition_owner_hashes_kind_and_key() -> None:
    ring = equal(names(5))
    assert partition_key("dispatch", "group-7") == "dispatch:group-7"
    for group in (f"group-{i}" for i in range(200)):
        assert ring.owner_of_partition("dispatch", group) == ring.owner(f"dispatch:{group}")
    # Different kinds of work for the same key land independently.
    kinds = ("dispatch", "sweep", "webhook")
    spread = {tuple(ring.owner_of_partition(k, f"g{i}") for k in kinds) for i in range(200)}
    assert len(spread) > 1


@pytest.mark.parametrize("kind", ["", "a:b"])
def test_partition_kind_is_validated(kind: str) -> None:
    with pytest.raises(ValueError, match="partition kind"):
        partition_key(kind, "x")


# -- properties -------------------------------------------------------------------------

PROBE = [f"probe-{i}" for i in range(300)]
memberships = st.dictionaries(
    keys=st.text(alphabet="abcxyz#-:é0123456789", min_size=1, max_size=6),
    values=st.floats(min_value=0.01, max_value=4.0),
    min_size=2,
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(weights=memberships, vnodes=st.integers(1, 30), data=st.data())
def test_removing_a_node_only_moves_its_keys(
    weights: dict[str, float], vnodes: int, data: st.DataObject
) -> None:
    gone = data.draw(st.sampled_from(sorted(weights)))
    old = Ring(weights, vnodes=vnodes)
    new = Ring({n: w for n, w in weights.items() if n != gone}, vnodes=vnodes)
    assert old.version != new.version
    for key in PROBE:
        before, after = old.owner(key), new.owner(key)
        if before == gone:
            assert after != gone
        else:
            assert after == before


@settings(max_examples=60, deadline=None)
@given(weights=memberships, vnodes=st.integers(1, 30), keys=st.lists(st.text(), max_size=20))
def test_owner_matches_the_definition(
    weights: dict[str, float], vnodes: int, keys: list[str]
) -> None:
    ring = Ring(weights, vnodes=vnodes)
    shuffled = Ring(dict(sorted(weights.items(), reverse=True)), vnodes=vnodes)
    assert shuffled.version == ring.version
    reference = reference_owner(ring)
    for key in [*keys, *PROBE[:50]]:
        owner = ring.owner(key)
        assert owner == reference(key) == shuffled.owner(key)
        chain = ring.owners(key, len(weights))
        assert chain[0] == owner and sorted(chain) == sorted(weights)


def test_version_is_reproducible_from_its_documented_form() -> None:
    # blake2b-64 of compact JSON [SCHEME, [[node, weight, points], ...] sorted by node].
    ring = Ring({"b": 0.5, "a": 1})
    canonical = json.dumps([SCHEME, [["a", 1.0, 100], ["b", 0.5, 50]]], separators=(",", ":"))
    assert ring.version == hashlib.blake2b(canonical.encode(), digest_size=8).hexdigest()
