"""The lifecycle table: next_state, sources and target agree with TRANSITIONS."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kefu.errors import ErrorCode, InvalidTransition
from kefu.lifecycle import (
    ACTIVE_STATES,
    OPEN_STATES,
    TRANSITIONS,
    Event,
    next_state,
    sources,
    target,
)
from kefu.model import ConversationState as S

LISTED = [(state, event) for state, events in TRANSITIONS.items() for event in events]
UNLISTED = [
    (state, event)
    for state, event in itertools.product(S, Event)
    if event not in TRANSITIONS.get(state, {})
]


def test_table_covers_every_state_and_event() -> None:
    assert set(TRANSITIONS) == set(S)
    used = {event for events in TRANSITIONS.values() for event in events}
    assert used == set(Event)
    for events in TRANSITIONS.values():
        assert set(events.values()) <= set(S)
    # sanity: the two lists partition every pair
    assert len(LISTED) + len(UNLISTED) == len(S) * len(Event)


@pytest.mark.parametrize(("state", "event"), LISTED, ids=lambda v: str(v))
def test_listed_pair_gives_listed_state(state: S, event: Event) -> None:
    assert next_state(state, event) is TRANSITIONS[state][event]


@pytest.mark.parametrize(("state", "event"), UNLISTED, ids=lambda v: str(v))
def test_unlisted_pair_raises(state: S, event: Event) -> None:
    with pytest.raises(InvalidTransition) as info:
        next_state(state, event)
    assert info.value.code is ErrorCode.INVALID_TRANSITION
    assert state.value in info.value.message


@pytest.mark.parametrize("event", list(Event))
def test_closed_is_final(event: Event) -> None:
    assert TRANSITIONS[S.CLOSED] == {}
    with pytest.raises(InvalidTransition):
        next_state(S.CLOSED, event)
    assert S.CLOSED not in sources(event)


@pytest.mark.parametrize("event", list(Event))
def test_sources_are_the_states_listing_the_event(event: Event) -> None:
    expected = {state for state, events in TRANSITIONS.items() if event in events}
    result = sources(event)
    assert isinstance(result, frozenset)
    assert result == expected
    assert result  # every event is allowed somewhere


@pytest.mark.parametrize("event", list(Event))
def test_target_is_unique_and_matches_table(event: Event) -> None:
    result = target(event)
    for state in sources(event):
        assert TRANSITIONS[state][event] is result
        assert next_state(state, event) is result


def test_close_allowed_from_every_state_but_closed() -> None:
    assert sources(Event.CLOSE) == frozenset(S) - {S.CLOSED}
    for state in sources(Event.CLOSE):
        assert next_state(state, Event.CLOSE) is S.CLOSED


def test_main_path() -> None:
    state = S.QUEUED
    path = []
    for event in (Event.ASSIGN, Event.WAIT, Event.CUSTOMER_REPLY, Event.RESOLVE, Event.CLOSE):
        state = next_state(state, event)
        path.append(state)
    assert path == [S.ASSIGNED, S.WAITING, S.ASSIGNED, S.RESOLVED, S.CLOSED]


@pytest.mark.parametrize("event", [Event.ASSIGN, Event.PICK, Event.TRANSFER, Event.TAKEOVER])
def test_ways_out_of_the_queue(event: Event) -> None:
    assert next_state(S.QUEUED, event) is S.ASSIGNED


def test_reopen_rules() -> None:
    assert next_state(S.RESOLVED, Event.REOPEN) is S.QUEUED
    assert next_state(S.RESOLVED, Event.REOPEN_TO_AGENT) is S.ASSIGNED
    assert sources(Event.REOPEN) == {S.RESOLVED}
    assert sources(Event.REOPEN_TO_AGENT) == {S.RESOLVED}
    for state in (S.QUEUED, S.ASSIGNED, S.WAITING, S.CLOSED):
        for event in (Event.REOPEN, Event.REOPEN_TO_AGENT):
            with pytest.raises(InvalidTransition):
                next_state(state, event)


def test_resolved_only_reopens_or_closes() -> None:
    assert set(TRANSITIONS[S.RESOLVED]) == {Event.REOPEN, Event.REOPEN_TO_AGENT, Event.CLOSE}


def test_accept_and_transfer_keep_state() -> None:
    assert next_state(S.ASSIGNED, Event.ACCEPT) is S.ASSIGNED
    assert next_state(S.ASSIGNED, Event.TRANSFER) is S.ASSIGNED
    assert next_state(S.ASSIGNED, Event.TAKEOVER) is S.ASSIGNED
    assert sources(Event.ACCEPT) == {S.ASSIGNED}


def test_requeue_and_resolve_sources() -> None:
    assert sources(Event.REQUEUE) == {S.QUEUED, S.ASSIGNED, S.WAITING}
    assert target(Event.REQUEUE) is S.QUEUED
    assert sources(Event.RESOLVE) == {S.ASSIGNED, S.WAITING}
    assert sources(Event.WAIT) == {S.ASSIGNED}
    assert sources(Event.CUSTOMER_REPLY) == {S.WAITING}


def test_every_state_reachable_from_queued() -> None:
    seen = {S.QUEUED}
    frontier = [S.QUEUED]
    while frontier:
        state = frontier.pop()
        for nxt in TRANSITIONS[state].values():
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen == set(S)


def test_state_sets() -> None:
    assert frozenset({S.ASSIGNED, S.WAITING}) == ACTIVE_STATES
    assert ACTIVE_STATES < OPEN_STATES
    assert S.CLOSED not in OPEN_STATES and S.RESOLVED not in OPEN_STATES


def test_event_values_are_distinct() -> None:
    assert len({e.value for e in Event}) == len(Event)


@given(start=st.sampled_from(list(S)), events=st.lists(st.sampled_from(list(Event)), max_size=40))
def test_random_event_sequences_follow_the_table(start: S, events: list[Event]) -> None:
    state = start
    closed = state is S.CLOSED
    for event in events:
        allowed = event in TRANSITIONS[state]
        try:
            new = next_state(state, event)
        except InvalidTransition:
            assert not allowed, (state, event)
            assert state not in sources(event)
            continue  # the state is unchanged
        assert allowed, (state, event)
        assert state in sources(event)
        assert new is TRANSITIONS[state][event] is target(event)
        state = new
        if closed:
            pytest.fail("left the closed state")
        closed = state is S.CLOSED
    assert closed == (state is S.CLOSED)
