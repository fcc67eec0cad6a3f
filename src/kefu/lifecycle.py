"""The conversation lifecycle: states, events and the transitions between them, as data.

Like h11's ``_state.py``, the rules are a table, not code spread over the services::

    queued ──assign/pick/transfer──▶ assigned ──wait──▶ waiting
      ▲  ▲                            │  ▲                │
      │  └──────requeue───────────────┘  └─customer_reply─┘
      │                               │                   │
      │                            resolve ◀──────────────┘
      │                               ▼
      └──────────reopen────────── resolved ──reopen_to_agent──▶ assigned
                                      │
    any state but closed ──close──▶ closed   (final: a later customer message starts a
                                              successor conversation)

``accept`` (the assigned agent takes the conversation) and ``transfer`` between agents keep
the state. Every event that happens is stored as a ``system`` message in the
conversation's history (so it has a seq, survives sync and is pushed to the participants);
an event the current state does not allow raises :class:`InvalidTransition` and changes
nothing. The store applies a transition as a compare-and-set on the state (see
:meth:`kefu.store.base.MessageStore.transition`), so two nodes racing on one conversation
cannot both win.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from kefu.errors import InvalidTransition
from kefu.model import ConversationState as S


class Event(enum.StrEnum):
    """Lifecycle events; the value is the ``event`` of the system message that records it."""

    ASSIGN = "assigned"  # the router gave a queued conversation to an agent
    PICK = "picked"  # an agent took it from the pool themselves
    ACCEPT = "accepted"  # the assigned agent took it on (explicitly or by replying)
    WAIT = "waiting"  # the agent waits on the customer
    CUSTOMER_REPLY = "customer_replied"  # the customer answered a waiting conversation
    TRANSFER = "transferred"  # to another agent (a transfer to a group is a requeue)
    REQUEUE = "requeued"  # back to a queue: transfer to a group, agent offline, no accept
    RESOLVE = "resolved"
    REOPEN = "reopened"  # a customer wrote after resolve; back to the queue
    REOPEN_TO_AGENT = "reopened_to_agent"  # ... and straight back to the same agent
    TAKEOVER = "taken_over"  # a supervisor made themselves the agent
    CLOSE = "closed"


#: state -> event -> next state. What is not listed is an invalid transition.
TRANSITIONS: Mapping[S, Mapping[Event, S]] = {
    S.QUEUED: {
        Event.ASSIGN: S.ASSIGNED,
        Event.PICK: S.ASSIGNED,
        Event.TRANSFER: S.ASSIGNED,
        Event.TAKEOVER: S.ASSIGNED,
        Event.REQUEUE: S.QUEUED,
        Event.CLOSE: S.CLOSED,
    },
    S.ASSIGNED: {
        Event.ACCEPT: S.ASSIGNED,
        Event.WAIT: S.WAITING,
        Event.TRANSFER: S.ASSIGNED,
        Event.TAKEOVER: S.ASSIGNED,
        Event.REQUEUE: S.QUEUED,
        Event.RESOLVE: S.RESOLVED,
        Event.CLOSE: S.CLOSED,
    },
    S.WAITING: {
        Event.CUSTOMER_REPLY: S.ASSIGNED,
        Event.TRANSFER: S.ASSIGNED,
        Event.TAKEOVER: S.ASSIGNED,
        Event.REQUEUE: S.QUEUED,
        Event.RESOLVE: S.RESOLVED,
        Event.CLOSE: S.CLOSED,
    },
    S.RESOLVED: {
        Event.REOPEN: S.QUEUED,
        Event.REOPEN_TO_AGENT: S.ASSIGNED,
        Event.CLOSE: S.CLOSED,
    },
    S.CLOSED: {},
}

#: States in which an agent holds the conversation (it counts toward their load).
ACTIVE_STATES = frozenset({S.ASSIGNED, S.WAITING})
#: States in which the conversation still takes messages from both sides.
OPEN_STATES = frozenset({S.QUEUED, S.ASSIGNED, S.WAITING})


def next_state(state: S, event: Event) -> S:
    """The state after ``event``; raises :class:`InvalidTransition` when not allowed."""
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise InvalidTransition(
            f"cannot {event.name.lower()} a conversation that is {state.value}"
        ) from None


def sources(event: Event) -> frozenset[S]:
    """Every state from which ``event`` is allowed (the store's compare-and-set guard)."""
    return frozenset(state for state, events in TRANSITIONS.items() if event in events)


def target(event: Event) -> S:
    """The state ``event`` leads to (the same from every source state)."""
    targets = {events[event] for events in TRANSITIONS.values() if event in events}
    assert len(targets) == 1, event
    return targets.pop()
