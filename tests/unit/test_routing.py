"""MemoryRouting: queues, presence, load and atomic assignment, with explicit ``now`` (ms)."""

from __future__ import annotations

import dataclasses
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kefu.errors import ErrorCode
from kefu.model import AgentStatus
from kefu.routing.base import Assignment, QueueEntry, RoutingError
from kefu.routing.memory import MemoryRouting

T = TypeVar("T")


@pytest.fixture
def routing() -> MemoryRouting:
    return MemoryRouting()


async def add_agent(
    r: MemoryRouting,
    agent_id: str,
    *,
    capacity: int = 3,
    groups: Iterable[str] = ("g",),
    now: int = 0,
    connect: bool = True,
) -> None:
    await r.configure_agent(agent_id, capacity, list(groups), now)
    if connect:
        await r.connected(agent_id, now)


def entry(conv: str, group: str = "g", since: int = 0, **kwargs: Any) -> QueueEntry:
    return QueueEntry(conv=conv, customer=f"cust-{conv}", group=group, since=since, **kwargs)


async def convs(r: MemoryRouting, group: str = "g") -> list[str]:
    return [e.conv for e in await r.queue(group)]


async def load(r: MemoryRouting, agent_id: str) -> int:
    state = await r.agent(agent_id)
    assert state is not None
    return state.load


# -- queues --------------------------------------------------------------------------------


async def test_fifo_per_group(routing: MemoryRouting) -> None:
    for i, (conv, group) in enumerate([("c1", "g"), ("x1", "h"), ("c2", "g"), ("c3", "g")]):
        await routing.enqueue(entry(conv, group, since=i))
    assert await convs(routing, "g") == ["c1", "c2", "c3"]
    assert await convs(routing, "h") == ["x1"]
    assert await routing.queued_groups() == ["g", "h"]

    await add_agent(routing, "a", capacity=10, groups=["g"])
    got = [await routing.assign_next("g", 100) for _ in range(4)]
    assert [a.conv if a else None for a in got] == ["c1", "c2", "c3", None]
    assert await convs(routing, "g") == []
    assert await convs(routing, "h") == ["x1"]
    assert await routing.queued_groups() == ["h"]


async def test_head_insertion_on_requeue(routing: MemoryRouting) -> None:
    await routing.enqueue(entry("c1", since=1))
    await routing.enqueue(entry("c2", since=2))
    await routing.enqueue(entry("c0", since=0), head=True)
    assert await convs(routing) == ["c0", "c1", "c2"]
    # re-enqueueing a queued conversation moves it, it is never duplicated
    await routing.enqueue(entry("c2", since=2), head=True)
    assert await convs(routing) == ["c2", "c0", "c1"]
    await routing.enqueue(entry("c2", since=2))
    assert await convs(routing) == ["c0", "c1", "c2"]
    # moving to another group takes it out of the first one
    await routing.enqueue(entry("c1", "h", since=1))
    assert await convs(routing) == ["c0", "c2"]
    assert await convs(routing, "h") == ["c1"]


async def test_requeued_entry_keeps_since_and_is_next(routing: MemoryRouting) -> None:
    await add_agent(routing, "a", capacity=1)
    await routing.enqueue(entry("c1", since=10))
    await routing.enqueue(entry("c2", since=20))
    first = await routing.assign_next("g", 100)
    assert first is not None and first.conv == "c1" and first.waited == 90
    await routing.release("a", "c1", 150)
    await routing.enqueue(entry("c1", since=10, excluded=frozenset({"x"})), head=True)
    again = await routing.assign_next("g", 200)
    assert again is not None and again.conv == "c1" and again.waited == 190


async def test_dequeue(routing: MemoryRouting) -> None:
    await routing.enqueue(entry("c1"))
    await routing.enqueue(entry("c2", backlog=True))
    taken = await routing.dequeue("c1")
    assert taken == entry("c1")
    assert await routing.dequeue("c1") is None
    assert await routing.dequeue("nope") is None
    assert (await routing.dequeue("c2")) == entry("c2", backlog=True)
    assert await routing.queued_groups() == []


async def test_waited_is_never_negative(routing: MemoryRouting) -> None:
    await add_agent(routing, "a")
    await routing.enqueue(entry("c1", since=500))
    got = await routing.assign_next("g", 400)
    assert got == Assignment(conv="c1", agent="a", group="g", customer="cust-c1", waited=0)


# -- choosing the agent --------------------------------------------------------------------


async def test_least_loaded_wins(routing: MemoryRouting) -> None:
    await add_agent(routing, "a", now=0)
    await add_agent(routing, "b", now=5)
    await routing.reserve("a", "held", 1)  # a: load 1, b: load 0 but connected later
    await routing.enqueue(entry("c1"))
    got = await routing.assign_next("g", 10)
    assert got is not None and got.agent == "b"


async def test_ties_go_to_oldest_last_assigned(routing: MemoryRouting) -> None:
    await add_agent(routing, "a", now=10)
    await add_agent(routing, "b", now=5)
    await add_agent(routing, "c", now=7)
    for i in range(6):
        await routing.enqueue(entry(f"c{i}", since=i))
    order = [(await routing.assign_next("g", 100 + i)) for i in range(6)]
    assert [a.agent for a in order if a] == ["b", "c", "a", "b", "c", "a"]


async def test_exact_tie_goes_to_smallest_id(routing: MemoryRouting) -> None:
    for agent_id in ("b", "c", "a"):
        await add_agent(routing, agent_id, now=0)
    await routing.enqueue(entry("c1"))
    got = await routing.assign_next("g", 1)
    assert got is not None and got.agent == "a"


async def test_coming_back_online_goes_to_end_of_line(routing: MemoryRouting) -> None:
    await add_agent(routing, "a", now=0)
    await add_agent(routing, "b", now=1)
    await routing.set_status("a", AgentStatus.AWAY, 2)
    await routing.set_status("a", AgentStatus.ONLINE, 3)
    state = await routing.agent("a")
    assert state is not None and state.last_assigned == 3
    await routing.enqueue(entry("c1"))
    got = await routing.assign_next("g", 4)
    assert got is not None and got.agent == "b"
    # ONLINE -> ONLINE does not move anyone
    await routing.set_status("b", AgentStatus.ONLINE, 50)
    state = await routing.agent("b")
    assert state is not None and state.last_assigned == 4


async def test_preferred_agent_wins_when_available(routing: MemoryRouting) -> None:
    await add_agent(routing, "a", now=0)
    await add_agent(routing, "b", now=1)
    await routing.reserve("b", "held", 2)  # b is busier and assigned more recently
    await routing.enqueue(entry("c1", prefer="b"))
    got = await routing.assign_next("g", 10)
    assert got is not None and got.agent == "b"


@pytest.mark.parametrize("why", ["away", "full", "other_group", "offline", "excluded", "unknown"])
async def test_preferred_agent_not_available_falls_back(routing: MemoryRouting, why: str) -> None:
    await add_agent(routing, "a", now=0)
    await add_agent(routing, "b", capacity=1, groups=["h"] if why == "other_group" else ["g"])
    excluded: frozenset[str] = frozenset()
    if why == "away":
        await routing.set_status("b", AgentStatus.AWAY, 1)
    elif why == "full":
        await routing.reserve("b", "held", 1)
    elif why == "offline":
        await routing.disconnected("b", 1)
    elif why == "excluded":
        excluded = frozenset({"b"})
    await routing.enqueue(
        entry("c1", prefer="nobody" if why == "unknown" else "b", excluded=excluded)
    )
    got = await routing.assign_next("g", 10)
    assert got is not None and got.agent == "a"


async def test_excluded_agent_only_when_nobody_else_is_free(routing: MemoryRouting) -> None:
    await add_agent(routing, "a", capacity=5, now=0)
    await add_agent(routing, "b", capacity=1, now=1)
    await routing.reserve("b", "held", 2)  # b is full: only the excluded a is free
    await routing.enqueue(entry("c1", since=1, excluded=frozenset({"a"})))
    got = await routing.assign_next("g", 10)
    assert got is not None and (got.conv, got.agent) == ("c1", "a")  # rather than never

    await routing.release("b", "held", 11)  # now someone else is free: they get it
    await routing.enqueue(entry("c2", since=12, excluded=frozenset({"a"})))
    got = await routing.assign_next("g", 13)
    assert got is not None and (got.conv, got.agent) == ("c2", "b")
    assert await convs(routing) == []


async def test_exclusions_are_per_entry(routing: MemoryRouting) -> None:
    await add_agent(routing, "a", now=0)
    await add_agent(routing, "b", now=1)
    await routing.enqueue(entry("c1", excluded=frozenset({"a"})))
    await routing.enqueue(entry("c2", excluded=frozenset({"b"})))
    first = await routing.assign_next("g", 10)
    second = await routing.assign_next("g", 11)
    assert first is not None and (first.conv, first.agent) == ("c1", "b")
    assert second is not None and (second.conv, second.agent) == ("c2", "a")


UNAVAILABLE = ["away", "offline_status", "never_connected", "disconnected", "full", "zero"]
UNAVAILABLE += ["other_group", "removed"]


@pytest.mark.parametrize("why", UNAVAILABLE)
async def test_unavailable_agents_get_nothing(routing: MemoryRouting, why: str) -> None:
    await add_agent(
        routing,
        "a",
        capacity=0 if why == "zero" else 1,
        groups=["h"] if why == "other_group" else ["g"],
        connect=why != "never_connected",
    )
    if why == "away":
        await routing.set_status("a", AgentStatus.AWAY, 1)
    elif why == "offline_status":
        await routing.set_status("a", AgentStatus.OFFLINE, 1)
    elif why == "disconnected":
        await routing.disconnected("a", 1)
    elif why == "full":
        assert await routing.reserve("a", "held", 1)
        await routing.accepted("a", "held")
    elif why == "removed":
        await routing.remove_agent("a")
    await routing.enqueue(entry("c1", prefer="a"))
    await routing.enqueue(entry("c2", backlog=True))
    assert await routing.assign_next("g", 10) is None
    assert await convs(routing) == ["c1", "c2"]
    state = await routing.agent("a")
    assert state is None or "c1" not in state.active
    assert await routing.unaccepted_since(10**12) == []


async def test_assignment_records_load_and_unaccepted(routing: MemoryRouting) -> None:
    await add_agent(routing, "a")
    await routing.enqueue(entry("c1", since=40))
    got = await routing.assign_next("g", 100)
    assert got == Assignment(conv="c1", agent="a", group="g", customer="cust-c1", waited=60)
    state = await routing.agent("a")
    assert state is not None
    assert state.active == {"c1"} and state.unaccepted == {"c1": 100}
    assert state.last_assigned == 100


async def test_assign_next_on_empty_or_unknown_group(routing: MemoryRouting) -> None:
    await add_agent(routing, "a")
    assert await routing.assign_next("g", 0) is None
    assert await routing.assign_next("nope", 0) is None


async def test_capacity_is_never_exceeded(routing: MemoryRouting) -> None:
    await add_agent(routing, "a", capacity=2, now=0)
    await add_agent(routing, "b", capacity=1, now=1)
    for i in range(5):
        await routing.enqueue(entry(f"c{i}", since=i))
    got = [await routing.assign_next("g", 10 + i) for i in range(5)]
    assigned = [a for a in got if a is not None]
    assert len(assigned) == 3
    assert await load(routing, "a") == 2 and await load(routing, "b") == 1
    assert [(a.conv, a.agent) for a in assigned] == [("c0", "a"), ("c1", "b"), ("c2", "a")]
    assert await convs(routing) == ["c3", "c4"]
    # release frees exactly one slot
    await routing.release("b", "c1", 20)
    got2 = await routing.assign_next("g", 21)
    assert got2 is not None and (got2.conv, got2.agent) == ("c3", "b")
    assert await routing.assign_next("g", 22) is None


# -- pick --------------------------------------------------------------------------------


async def test_pick(routing: MemoryRouting) -> None:
    await add_agent(routing, "a", capacity=2)
    await routing.enqueue(entry("c1", since=1))
    await routing.enqueue(entry("c2", since=2))
    await routing.enqueue(entry("c3", since=3, backlog=True))
    got = await routing.pick("a", "c2", 50)
    assert got == Assignment(conv="c2", agent="a", group="g", customer="cust-c2", waited=48)
    got = await routing.pick("a", "c3", 60)  # a left message can be picked too
    assert got.conv == "c3"
    assert await convs(routing) == ["c1"]
    state = await routing.agent("a")
    assert state is not None and state.active == {"c2", "c3"}
    assert state.unaccepted == {"c2": 50, "c3": 60}


async def _refused(routing: MemoryRouting, agent: str, conv: str, code: ErrorCode) -> None:
    before = await routing.queue("g")
    with pytest.raises(RoutingError) as info:
        await routing.pick(agent, conv, 100)
    assert info.value.code is code
    assert await routing.queue("g") == before


async def test_pick_not_found(routing: MemoryRouting) -> None:
    await add_agent(routing, "a")
    await _refused(routing, "a", "nope", ErrorCode.NOT_FOUND)
    await routing.enqueue(entry("c1"))
    await routing.pick("a", "c1", 10)
    await _refused(routing, "a", "c1", ErrorCode.NOT_FOUND)  # already taken
    await add_agent(routing, "b")
    await _refused(routing, "b", "c1", ErrorCode.NOT_FOUND)


async def test_pick_not_member(routing: MemoryRouting) -> None:
    await add_agent(routing, "a", groups=["h"])
    await routing.enqueue(entry("c1"))
    await _refused(routing, "a", "c1", ErrorCode.NOT_MEMBER)
    await _refused(routing, "stranger", "c1", ErrorCode.NOT_MEMBER)


@pytest.mark.parametrize("why", ["full", "zero", "never_connected", "disconnected"])
async def test_pick_agent_unavailable(routing: MemoryRouting, why: str) -> None:
    await add_agent(
        routing, "a", capacity=0 if why == "zero" else 1, connect=why != "never_connected"
    )
    if why == "full":
        await routing.reserve("a", "held", 1)
    elif why == "disconnected":
        await routing.disconnected("a", 1)
    await routing.enqueue(entry("c1"))
    await _refused(routing, "a", "c1", ErrorCode.AGENT_UNAVAILABLE)
    state = await routing.agent("a")
    assert state is not None and "c1" not in state.active


@pytest.mark.parametrize("status", [AgentStatus.AWAY, AgentStatus.OFFLINE])
async def test_pick_refused_when_not_online(routing: MemoryRouting, status: AgentStatus) -> None:
    await add_agent(routing, "a")
    await routing.set_status("a", status, 1)
    await routing.enqueue(entry("c1"))
    await _refused(routing, "a", "c1", ErrorCode.AGENT_UNAVAILABLE)


# -- reserve / release ---------------------------------------------------------------------


async def test_reserve_takes_a_slot_and_the_queue_entry(routing: MemoryRouting) -> None:
    await add_agent(routing, "a", capacity=1)
    await routing.enqueue(entry("c1"))
    assert await routing.reserve("a", "c1", 70)
    assert await convs(routing) == []
    state = await routing.agent("a")
    assert state is not None
    assert state.active == {"c1"} and state.unaccepted == {"c1": 70}
    assert state.last_assigned == 70
    # holding it already: still True, even at capacity
    assert await routing.reserve("a", "c1", 80)
    assert await load(routing, "a") == 1


async def test_reserve_without_force_respects_capacity(routing: MemoryRouting) -> None:
    await add_agent(routing, "a", capacity=1)
    assert await routing.reserve("a", "c1", 1)
    await routing.enqueue(entry("c2"))
    assert not await routing.reserve("a", "c2", 2)
    state = await routing.agent("a")
    assert state is not None and state.active == {"c1"} and state.last_assigned == 1
    assert await convs(routing) == ["c2"]  # refused: the queue is untouched


async def test_reserve_with_force_ignores_capacity_and_status(routing: MemoryRouting) -> None:
    await add_agent(routing, "a", capacity=1)
    assert await routing.reserve("a", "c1", 1)
    assert await routing.reserve("a", "c2", 2, force=True)
    assert await load(routing, "a") == 2
    await routing.set_status("a", AgentStatus.AWAY, 3)
    assert not await routing.reserve("a", "c3", 4)
    assert await routing.reserve("a", "c3", 4, force=True)
    await routing.disconnected("a", 5)
    assert not await routing.reserve("a", "c4", 6)
    assert await routing.reserve("a", "c4", 6, force=True)
    assert await load(routing, "a") == 4


async def test_reserve_for_unknown_agent(routing: MemoryRouting) -> None:
    await routing.enqueue(entry("c1"))
    assert not await routing.reserve("admin", "c1", 1)
    assert await routing.reserve("admin", "c1", 1, force=True)
    assert await routing.agents() == []


async def test_release_frees_capacity(routing: MemoryRouting) -> None:
    await add_agent(routing, "a", capacity=1)
    await routing.enqueue(entry("c1"))
    await routing.enqueue(entry("c2"))
    assert (await routing.assign_next("g", 1)) is not None
    assert await routing.assign_next("g", 2) is None
    await routing.release("a", "c1", 3)
    state = await routing.agent("a")
    assert state is not None and state.active == set() and state.unaccepted == {}
    got = await routing.assign_next("g", 4)
    assert got is not None and got.conv == "c2"


async def test_release_of_what_is_not_held_is_harmless(routing: MemoryRouting) -> None:
    await add_agent(routing, "a")
    await routing.reserve("a", "c1", 1)
    await routing.release("a", "other", 2)
    await routing.release("b", "c1", 2)
    await routing.release("nobody", "c1", 2)
    assert await load(routing, "a") == 1


# -- presence ------------------------------------------------------------------------------


async def test_connection_counting_and_effective_status(routing: MemoryRouting) -> None:
    assert await routing.connected("nobody", 0) is None
    assert await routing.disconnected("nobody", 0) is None
    await routing.configure_agent("a", 2, ["g"], 5)
    state = await routing.agent("a")
    assert state is not None
    assert (state.connections, state.effective, state.disconnected_at) == (
        0,
        AgentStatus.OFFLINE,
        5,
    )
    assert state.status is AgentStatus.ONLINE

    state = await routing.connected("a", 10)
    assert state is not None and state.connections == 1 and state.disconnected_at is None
    assert state.effective is AgentStatus.ONLINE and state.last_assigned == 10
    state = await routing.connected("a", 20)
    assert state is not None and state.connections == 2 and state.last_assigned == 10

    state = await routing.disconnected("a", 30)
    assert state is not None and state.connections == 1 and state.disconnected_at is None
    assert state.effective is AgentStatus.ONLINE
    state = await routing.disconnected("a", 40)
    assert state is not None and state.connections == 0 and state.disconnected_at == 40
    assert state.effective is AgentStatus.OFFLINE

    state = await routing.disconnected("a", 50)  # never below zero
    assert state is not None and state.connections == 0
    state = await routing.connected("a", 60)
    assert state is not None and state.connections == 1


async def test_effective_status_follows_chosen_status_while_connected(
    routing: MemoryRouting,
) -> None:
    await add_agent(routing, "a")
    for status in AgentStatus:
        state = await routing.set_status("a", status, 1)
        assert state.status is status and state.effective is status
    await routing.set_status("a", AgentStatus.AWAY, 2)
    gone = await routing.disconnected("a", 3)
    assert gone is not None
    assert gone.status is AgentStatus.AWAY and gone.effective is AgentStatus.OFFLINE


async def test_set_status_of_unknown_agent(routing: MemoryRouting) -> None:
    with pytest.raises(RoutingError) as info:
        await routing.set_status("nobody", AgentStatus.ONLINE, 0)
    assert info.value.code is ErrorCode.NOT_FOUND


async def test_configure_keeps_status_connections_and_load(routing: MemoryRouting) -> None:
    await add_agent(routing, "a", capacity=2, groups=["g"])
    await routing.set_status("a", AgentStatus.AWAY, 1)
    await routing.reserve("a", "c1", 2, force=True)
    await routing.configure_agent("a", 5, ["h", "k"], 3)
    state = await routing.agent("a")
    assert state is not None
    assert state.capacity == 5 and state.groups == {"h", "k"}
    assert state.status is AgentStatus.AWAY and state.connections == 1
    assert state.active == {"c1"}
    await routing.remove_agent("a")
    assert await routing.agent("a") is None
    await routing.remove_agent("a")  # twice is fine


async def test_gone(routing: MemoryRouting) -> None:
    grace = 1000
    await add_agent(routing, "holds_connected", now=0)
    await add_agent(routing, "holds_gone", now=0)
    await add_agent(routing, "empty_gone", now=0)
    await add_agent(routing, "two_tabs", now=0)
    await routing.connected("two_tabs", 0)
    for agent_id in ("holds_connected", "holds_gone", "two_tabs"):
        assert await routing.reserve(agent_id, f"c-{agent_id}", 0)
    await routing.disconnected("holds_gone", 100)
    await routing.disconnected("empty_gone", 100)
    await routing.disconnected("two_tabs", 100)  # one tab left

    assert await routing.gone(grace, 100 + grace - 1) == []
    assert await routing.gone(grace, 100 + grace + 1) == ["holds_gone"]
    assert await routing.gone(0, 10**9) == ["holds_gone"]

    await routing.connected("holds_gone", 5000)
    assert await routing.gone(grace, 10**9) == []
    await routing.disconnected("holds_gone", 6000)
    assert await routing.gone(grace, 6000 + grace // 2) == []
    assert await routing.gone(grace, 6000 + grace + 1) == ["holds_gone"]
    await routing.release("holds_gone", "c-holds_gone", 7000)
    assert await routing.gone(grace, 10**9) == []


async def test_gone_includes_never_connected_holders(routing: MemoryRouting) -> None:
    await add_agent(routing, "a", now=100, connect=False)
    assert await routing.reserve("a", "c1", 100, force=True)  # e.g. rebuilt from the store
    assert await routing.gone(50, 149) == []
    assert await routing.gone(50, 151) == ["a"]


async def test_unaccepted_since_and_accepted(routing: MemoryRouting) -> None:
    await add_agent(routing, "a", now=0)
    await add_agent(routing, "b", now=1)
    await routing.enqueue(entry("c1"))
    await routing.enqueue(entry("c2"))
    await routing.enqueue(entry("c3"))
    await routing.assign_next("g", 100)  # c1 -> a
    await routing.assign_next("g", 200)  # c2 -> b
    await routing.pick("a", "c3", 300)
    await routing.reserve("b", "c4", 350)  # a reserved slot waits for its accept too
    await routing.reserve("b", "c5", 360, force=True)
    await routing.accepted("b", "c5")  # e.g. an agent's own outreach: accepted at once

    assert await routing.unaccepted_since(100) == []  # strictly before
    assert await routing.unaccepted_since(101) == [("a", "c1")]
    assert sorted(await routing.unaccepted_since(10**9)) == [
        ("a", "c1"),
        ("a", "c3"),
        ("b", "c2"),
        ("b", "c4"),
    ]

    await routing.accepted("a", "c1")
    await routing.accepted("b", "c1")  # not b's: no effect
    await routing.accepted("nobody", "c2")
    assert sorted(await routing.unaccepted_since(10**9)) == [("a", "c3"), ("b", "c2"), ("b", "c4")]
    state = await routing.agent("a")
    assert state is not None and state.active == {"c1", "c3"}  # accepting keeps the slot

    await routing.release("b", "c2", 400)
    await routing.release("b", "c4", 400)
    assert await routing.unaccepted_since(10**9) == [("a", "c3")]


# -- backlog -------------------------------------------------------------------------------


async def test_move_to_backlog(routing: MemoryRouting) -> None:
    await routing.enqueue(entry("old_msg", since=0, backlog=True))
    await routing.enqueue(entry("c1", since=10))
    await routing.enqueue(entry("c2", since=20))
    await routing.enqueue(entry("c3", since=30))
    await routing.enqueue(entry("other", "h", since=0))

    moved = await routing.move_to_backlog("g", 30)
    assert moved == [entry("c1", since=10, backlog=True), entry("c2", since=20, backlog=True)]
    queue = await routing.queue("g")
    assert [(e.conv, e.backlog) for e in queue] == [
        ("c3", False),
        ("old_msg", True),
        ("c1", True),
        ("c2", True),
    ]
    assert await convs(routing, "h") == ["other"]
    assert await routing.move_to_backlog("g", 30) == []  # nothing live that old any more
    assert await routing.move_to_backlog("empty", 10**9) == []

    # new live entries still come before every left message
    await routing.enqueue(entry("c4", since=40))
    assert await convs(routing) == ["c3", "c4", "old_msg", "c1", "c2"]

    # and left messages are still assignable, after the live ones
    await add_agent(routing, "a", capacity=10)
    order = [await routing.assign_next("g", 100 + i) for i in range(6)]
    assert [a.conv if a else None for a in order] == ["c3", "c4", "old_msg", "c1", "c2", None]


async def test_live_entry_first_even_with_only_its_excluded_agent(
    routing: MemoryRouting,
) -> None:
    await add_agent(routing, "a")
    await routing.enqueue(entry("live", excluded=frozenset({"a"})))
    await routing.enqueue(entry("left", backlog=True))
    got = await routing.assign_next("g", 1)
    assert got is not None and got.conv == "live"
    assert await convs(routing) == ["left"]


async def test_backlog_head_insertion(routing: MemoryRouting) -> None:
    await routing.enqueue(entry("b1", backlog=True))
    await routing.enqueue(entry("b0", backlog=True), head=True)
    await routing.enqueue(entry("l1"))
    assert await convs(routing) == ["l1", "b0", "b1"]
    # moving back to live
    await routing.enqueue(entry("b1"), head=True)
    assert await convs(routing) == ["b1", "l1", "b0"]


# -- snapshots -----------------------------------------------------------------------------


async def test_agent_snapshots_are_copies(routing: MemoryRouting) -> None:
    await add_agent(routing, "a", capacity=2)
    await routing.enqueue(entry("c1"))
    await routing.assign_next("g", 10)
    snapshots = [
        await routing.agent("a"),
        *(await routing.agents()),
        await routing.connected("a", 11),
        await routing.disconnected("a", 12),
        await routing.set_status("a", AgentStatus.ONLINE, 13),
    ]
    for snap in snapshots:
        assert snap is not None
        snap.active.add("evil")
        snap.active.discard("c1")
        snap.unaccepted["evil"] = 0
        snap.unaccepted.pop("c1", None)
        snap.capacity = 0
        snap.status = AgentStatus.OFFLINE
        snap.connections = 99
        snap.groups = frozenset()
    state = await routing.agent("a")
    assert state is not None
    assert state.active == {"c1"} and state.unaccepted == {"c1": 10}
    assert state.capacity == 2 and state.status is AgentStatus.ONLINE
    assert state.connections == 1 and state.groups == {"g"}


async def test_queue_entries_are_copies(routing: MemoryRouting) -> None:
    original = entry("c1", since=5)
    await routing.enqueue(original)
    original.since = 999
    original.group = "h"
    await routing.enqueue(entry("c2", since=6))
    await routing.enqueue(entry("c3", since=7))

    for snap in await routing.queue("g"):
        snap.since = 1000
        snap.excluded = frozenset({"x"})
        snap.backlog = True
        snap.prefer = "x"
    moved = await routing.move_to_backlog("g", 6)
    assert [e.conv for e in moved] == ["c1"]
    moved[0].backlog = False
    moved[0].since = 0
    taken = await routing.dequeue("c2")
    assert taken is not None
    taken.conv = "zzz"

    queue = await routing.queue("g")
    assert queue == [entry("c3", since=7), entry("c1", since=5, backlog=True)]
    assert await routing.queue("h") == []


# -- many interleaved operations against a model -------------------------------------------


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a MemoryRouting coroutine that must finish without ever suspending (atomicity)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("a MemoryRouting method suspended")


AGENTS = ("a0", "a1", "a2", "a3")
GROUPS = ("g1", "g2")


@dataclasses.dataclass
class ModelAgent:
    capacity: int
    groups: frozenset[str]
    status: AgentStatus = AgentStatus.ONLINE
    connections: int = 0
    active: set[str] = dataclasses.field(default_factory=set)
    unaccepted: dict[str, int] = dataclasses.field(default_factory=dict)
    last_assigned: int = 0

    @property
    def load(self) -> int:
        return len(self.active)

    def available(self) -> bool:
        return (
            self.status is AgentStatus.ONLINE
            and self.connections > 0
            and len(self.active) < self.capacity
        )


class RoutingMachine(RuleBasedStateMachine):
    """Random interleavings of every MemoryRouting operation, checked against a model."""

    def __init__(self) -> None:
        super().__init__()
        self.r = MemoryRouting()
        self.now = 0
        self.counter = 0
        self.agents: dict[str, ModelAgent] = {}
        self.live: dict[str, list[str]] = {g: [] for g in GROUPS}
        self.backlog: dict[str, list[str]] = {g: [] for g in GROUPS}
        self.entries: dict[str, QueueEntry] = {}

    # -- model helpers --

    def _model_remove(self, conv: str) -> None:
        old = self.entries.pop(conv, None)
        if old is not None:
            (self.backlog if old.backlog else self.live)[old.group].remove(conv)

    def _model_enqueue(self, e: QueueEntry, head: bool) -> None:
        self._model_remove(e.conv)
        lst = (self.backlog if e.backlog else self.live)[e.group]
        if head:
            lst.insert(0, e.conv)
        else:
            lst.append(e.conv)
        self.entries[e.conv] = dataclasses.replace(e)

    def _holder(self, conv: str) -> str | None:
        holders = [a for a, m in self.agents.items() if conv in m.active]
        assert len(holders) <= 1
        return holders[0] if holders else None

    def _best(self, e: QueueEntry) -> str | None:
        if e.prefer is not None and e.prefer not in e.excluded:
            m = self.agents.get(e.prefer)
            if m is not None and e.group in m.groups and m.available():
                return e.prefer
        candidates = [
            (m.load, m.last_assigned, a)
            for a, m in self.agents.items()
            if e.group in m.groups and a not in e.excluded and m.available()
        ]
        if not candidates:  # the excluded ones only when nobody else is free
            candidates = [
                (m.load, m.last_assigned, a)
                for a, m in self.agents.items()
                if e.group in m.groups and m.available()
            ]
        return min(candidates)[2] if candidates else None

    def _give(self, agent: str, conv: str) -> None:
        """An assign_next or pick succeeded: the entry leaves the queue exactly once."""
        assert conv in self.entries, f"{conv} was not queued"
        assert self._holder(conv) is None, f"{conv} handed out twice"
        self._model_remove(conv)
        m = self.agents[agent]
        m.active.add(conv)
        m.unaccepted[conv] = self.now
        m.last_assigned = self.now

    def _new_conv(self) -> str:
        self.counter += 1
        return f"c{self.counter}"

    # -- rules --

    @initialize(
        setup=st.lists(
            st.tuples(
                st.integers(1, 3),  # capacity (0 is covered above)
                st.sets(st.sampled_from(GROUPS), min_size=1),
                st.sampled_from([1, 1, 2, 0]),  # connections
                st.integers(0, 20),  # when they connect
            ),
            min_size=len(AGENTS),
            max_size=len(AGENTS),
        )
    )
    def setup_agents(self, setup: list[tuple[int, set[str], int, int]]) -> None:
        for agent_id, (capacity, groups, _, _) in zip(AGENTS, setup, strict=True):
            drive(self.r.configure_agent(agent_id, capacity, groups, self.now))
            self.agents[agent_id] = ModelAgent(capacity, frozenset(groups))
        by_time = sorted(zip(AGENTS, setup, strict=True), key=lambda item: item[1][3])
        for agent_id, (_, _, connections, at) in by_time:
            self.now = at
            for _ in range(connections):
                self.connect(agent_id)

    @rule(ms=st.integers(0, 50))
    def tick(self, ms: int) -> None:
        self.now += ms

    @rule(agent=st.sampled_from(AGENTS))
    def connect(self, agent: str) -> None:
        m = self.agents[agent]
        if m.connections == 0:
            m.last_assigned = max(m.last_assigned, self.now)
        m.connections += 1
        drive(self.r.connected(agent, self.now))

    @rule(agent=st.sampled_from(AGENTS))
    def disconnect(self, agent: str) -> None:
        m = self.agents[agent]
        m.connections = max(0, m.connections - 1)
        drive(self.r.disconnected(agent, self.now))

    @rule(
        agent=st.sampled_from(AGENTS),
        status=st.sampled_from([AgentStatus.ONLINE, AgentStatus.ONLINE, *AgentStatus]),
    )
    def set_status(self, agent: str, status: AgentStatus) -> None:
        m = self.agents[agent]
        if status is AgentStatus.ONLINE and m.status is not AgentStatus.ONLINE:
            m.last_assigned = max(m.last_assigned, self.now)
        m.status = status
        drive(self.r.set_status(agent, status, self.now))

    @rule(
        group=st.sampled_from(GROUPS),
        prefer=st.none() | st.sampled_from(AGENTS),
        excluded=st.just(frozenset()) | st.frozensets(st.sampled_from(AGENTS), max_size=2),
        backlog=st.booleans(),
        head=st.booleans(),
        count=st.integers(1, 4),
    )
    def enqueue(
        self,
        group: str,
        prefer: str | None,
        excluded: frozenset[str],
        backlog: bool,
        head: bool,
        count: int,
    ) -> None:
        for _ in range(count):
            e = QueueEntry(
                conv=self._new_conv(),
                customer="cust",
                group=group,
                since=self.now,
                prefer=prefer,
                excluded=excluded,
                backlog=backlog,
            )
            self._model_enqueue(e, head)
            drive(self.r.enqueue(e, head=head))
            self.now += 1

    @precondition(lambda self: any(m.active for m in self.agents.values()))
    @rule(data=st.data(), group=st.sampled_from(GROUPS))
    def requeue_held(self, data: st.DataObject, group: str) -> None:
        """Release a held conversation and put it back at the head (the accept timeout)."""
        held = sorted((c, a) for a, m in self.agents.items() for c in m.active)
        conv, agent = data.draw(st.sampled_from(held))
        self.agents[agent].active.discard(conv)
        self.agents[agent].unaccepted.pop(conv, None)
        drive(self.r.release(agent, conv, self.now))
        e = QueueEntry(conv, "cust", group, self.now, excluded=frozenset({agent}))
        self._model_enqueue(e, head=True)
        drive(self.r.enqueue(e, head=True))

    @rule(group=st.sampled_from(GROUPS), times=st.integers(1, 4))
    def assign_next(self, group: str, times: int) -> None:
        for _ in range(times):
            self._assign_one(group)
            self.now += 1

    def _assign_one(self, group: str) -> None:
        expected: tuple[str, str] | None = None
        for conv in self.live[group] + self.backlog[group]:
            best = self._best(self.entries[conv])
            if best is not None:
                expected = (conv, best)
                break
        since = self.entries[expected[0]].since if expected else 0
        got = drive(self.r.assign_next(group, self.now))
        if expected is None:
            assert got is None
            return
        assert got is not None
        assert (got.conv, got.agent, got.group) == (*expected, group)
        assert got.waited == self.now - since
        self._give(got.agent, got.conv)

    @rule(data=st.data(), agent=st.sampled_from(AGENTS))
    def pick(self, data: st.DataObject, agent: str) -> None:
        known = sorted(self.entries) + sorted(c for m in self.agents.values() for c in m.active)
        conv = data.draw(st.sampled_from([*known, "missing"]))
        m = self.agents[agent]
        e = self.entries.get(conv)
        code: ErrorCode | None = None
        if e is None:
            code = ErrorCode.NOT_FOUND
        elif e.group not in m.groups:
            code = ErrorCode.NOT_MEMBER
        elif m.connections == 0 or len(m.active) >= m.capacity:
            code = ErrorCode.AGENT_UNAVAILABLE
        elif m.status is not AgentStatus.ONLINE:
            return  # disputed: see test_pick_refused_when_not_online
        if code is not None:
            with pytest.raises(RoutingError) as info:
                drive(self.r.pick(agent, conv, self.now))
            assert info.value.code is code
            return
        got = drive(self.r.pick(agent, conv, self.now))
        assert (got.conv, got.agent) == (conv, agent)
        self._give(agent, conv)

    @rule(data=st.data(), agent=st.sampled_from(AGENTS))
    def reserve(self, data: st.DataObject, agent: str) -> None:
        """Reserve a queued or a brand-new conversation (never one another agent holds)."""
        conv = data.draw(st.sampled_from([*sorted(self.entries), "new"]))
        if conv == "new":
            conv = self._new_conv()
        m = self.agents[agent]
        ok = m.available()
        got = drive(self.r.reserve(agent, conv, self.now))
        assert got is ok
        if ok:
            self._model_remove(conv)
            m.active.add(conv)
            m.unaccepted[conv] = self.now  # a new slot waits for its accept, like any other
            m.last_assigned = self.now

    @precondition(lambda self: any(m.active for m in self.agents.values()))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        held = sorted((c, a) for a, m in self.agents.items() for c in m.active)
        conv, agent = data.draw(st.sampled_from(held))
        self.agents[agent].active.discard(conv)
        self.agents[agent].unaccepted.pop(conv, None)
        drive(self.r.release(agent, conv, self.now))

    @rule(agent=st.sampled_from(AGENTS), conv=st.sampled_from(["c1", "c2", "nope"]))
    def release_anything(self, agent: str, conv: str) -> None:
        m = self.agents[agent]
        m.active.discard(conv)
        m.unaccepted.pop(conv, None)
        drive(self.r.release(agent, conv, self.now))

    @precondition(lambda self: any(m.unaccepted for m in self.agents.values()))
    @rule(data=st.data())
    def accept(self, data: st.DataObject) -> None:
        pending = sorted((c, a) for a, m in self.agents.items() for c in m.unaccepted)
        conv, agent = data.draw(st.sampled_from(pending))
        del self.agents[agent].unaccepted[conv]
        drive(self.r.accepted(agent, conv))

    @precondition(lambda self: bool(self.entries))
    @rule(data=st.data())
    def dequeue(self, data: st.DataObject) -> None:
        conv = data.draw(st.sampled_from(sorted(self.entries)))
        expected = self.entries[conv]
        self._model_remove(conv)
        assert drive(self.r.dequeue(conv)) == expected

    @rule(group=st.sampled_from(GROUPS), age=st.integers(0, 200))
    def move_to_backlog(self, group: str, age: int) -> None:
        older_than = self.now - age
        moved = [c for c in self.live[group] if self.entries[c].since < older_than]
        for conv in moved:
            e = dataclasses.replace(self.entries[conv], backlog=True)
            self._model_enqueue(e, head=False)
        got = drive(self.r.move_to_backlog(group, older_than))
        assert [e.conv for e in got] == moved
        assert all(e.backlog for e in got)

    @rule()
    def check_unaccepted(self) -> None:
        before = self.now
        expected = sorted(
            (a, c) for a, m in self.agents.items() for c, at in m.unaccepted.items() if at < before
        )
        assert sorted(drive(self.r.unaccepted_since(before))) == expected

    # -- invariants --

    @invariant()
    def no_agent_over_capacity(self) -> None:
        for state in drive(self.r.agents()):
            assert state.load <= state.capacity, state

    @invariant()
    def no_conversation_held_twice_or_both_held_and_queued(self) -> None:
        held: list[str] = [c for s in drive(self.r.agents()) for c in s.active]
        assert len(held) == len(set(held))
        queued = [e.conv for g in GROUPS for e in drive(self.r.queue(g))]
        assert len(queued) == len(set(queued))
        assert not set(held) & set(queued)

    @invariant()
    def backend_matches_model(self) -> None:
        for g in GROUPS:
            queue = drive(self.r.queue(g))
            assert [e.conv for e in queue] == self.live[g] + self.backlog[g]
            assert queue == [self.entries[c] for c in self.live[g] + self.backlog[g]]
        assert drive(self.r.queued_groups()) == sorted(
            g for g in GROUPS if self.live[g] or self.backlog[g]
        )
        for state in drive(self.r.agents()):
            m = self.agents[state.id]
            assert state.active == m.active
            assert state.unaccepted == m.unaccepted
            assert state.connections == m.connections
            assert state.status is m.status
            assert state.last_assigned == m.last_assigned


TestRoutingMachine = RoutingMachine.TestCase
TestRoutingMachine.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
