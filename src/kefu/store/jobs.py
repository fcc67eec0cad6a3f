"""What both stores share: building write jobs (new conversations, appends, transitions)
and turning their results into the interface's values and errors.

The job and result types themselves are msgspec Structs in :mod:`kefu.store.sqlite_writer`
(they cross a pipe to the SQLite writer process); the PostgreSQL writer runs the same jobs
in its own transactions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping

import msgspec

from kefu import ids
from kefu.errors import (
    ErrorCode,
    Forbidden,
    InvalidTransition,
    KefuError,
    NotFound,
    StaleConversation,
    StoreError,
)
from kefu.model import Conversation, ConversationState, NewMessage, StoredMessage
from kefu.store import sqlite_writer as w


def failure(result: w.Failed) -> KefuError:
    """The exception a failed write result stands for."""
    if result.code == "not_found":
        return NotFound(result.message)
    if result.code == "invalid_transition":
        return InvalidTransition(result.message)
    if result.code == "stale":
        return StaleConversation(result.message)
    return StoreError(result.message)


def settle(future: asyncio.Future[StoredMessage], result: w.Result) -> None:
    """Resolve an append's future with its stored message, or fail it."""
    if future.done():
        return
    if isinstance(result, w.Failed):
        future.set_exception(failure(result))
    else:
        assert isinstance(result, w.Stored)
        future.set_result(stored_message(result))


def stored_message(result: w.Stored) -> StoredMessage:
    # Stored mirrors StoredMessage field for field (tests/unit/test_store_types.py).
    return StoredMessage(*msgspec.structs.astuple(result))


def new_conversation(
    *,
    customer_id: str,
    agent_id: str | None,
    group_id: str | None,
    context_type: str | None,
    context: bytes | None,
) -> Conversation:
    """A new conversation: assigned (and accepted) when an agent starts it, else queued."""
    now = ids.now_ms()
    stamp = now if agent_id else None
    return Conversation(
        id=ids.new_id(),
        customer_id=customer_id,
        agent_id=agent_id,
        group_id=group_id,
        state=ConversationState.ASSIGNED if agent_id else ConversationState.QUEUED,
        context_type=context_type,
        context=context,
        created_at=now,
        updated_at=now,
        assigned_at=stamp,
        first_assigned_at=stamp,
        accepted_at=stamp,
    )


def append_job(message: NewMessage) -> w.Append:
    return w.Append(
        conv=message.conv,
        sender=message.sender,
        sender_role=message.sender_role.value,
        client_msg_id=message.client_msg_id,
        type=message.type,
        body=message.body,
        visibility=message.visibility.value,
        expect_state=None if message.expect is None else message.expect[0].value,
        expect_agent=None if message.expect is None else message.expect[1],
    )


def transition_job(
    conv_id: str,
    *,
    from_states: Collection[ConversationState],
    to_state: ConversationState,
    event_body: bytes,
    sender: str,
    sender_role: str,
    if_agent: str | None,
    sets: Mapping[str, str | int | None] | None,
    stamps: Collection[str],
    first_stamps: Collection[str],
) -> w.Transition:
    """The job of :meth:`MessageStore.transition` (see there)."""
    return w.Transition(
        conv=conv_id,
        from_states=[s.value for s in from_states],
        to_state=to_state.value,
        if_agent=if_agent,
        sets=dict(sets or {}),
        stamps=list(stamps),
        first_stamps=list(first_stamps),
        sender=sender,
        sender_role=sender_role,
        body=event_body,
    )


def rating_refused(conv_id: str, current: Conversation | None, customer_id: str) -> KefuError:
    """Why a rating's compare-and-set matched nothing, from the conversation as it is."""
    if current is None:
        return NotFound(f"conversation {conv_id!r} does not exist")
    if current.customer_id != customer_id:
        return Forbidden(f"conversation {conv_id!r} is not yours")
    if current.csat_score is not None:
        return KefuError("this conversation is rated already", code=ErrorCode.ALREADY_RATED)
    return InvalidTransition(f"conversation {conv_id!r} is {current.state}, not resolved")


def create_job(conv: Conversation) -> w.Create:
    return w.Create(
        id=conv.id,
        customer_id=conv.customer_id,
        agent_id=conv.agent_id,
        group_id=conv.group_id,
        state=conv.state.value,
        context_type=conv.context_type,
        context=conv.context,
        created_at=conv.created_at,
    )


__all__ = [
    "append_job",
    "create_job",
    "failure",
    "new_conversation",
    "rating_refused",
    "settle",
    "stored_message",
    "transition_job",
]
