"""Wire views of domain records: the frames (and webhook JSON) that show a message, a
conversation or an agent."""

from __future__ import annotations

from typing import Any

import msgspec

from kefu.model import Conversation, StoredMessage
from kefu.protocol import frames as f
from kefu.routing import AgentState


def message_frame(message: StoredMessage) -> f.Message:
    return f.Message(
        conv=message.conv,
        seq=message.seq,
        msg_id=message.msg_id,
        sender=message.sender,
        sender_role=message.sender_role,
        type=message.type,
        body=msgspec.Raw(message.body),
        ts=message.ts,
        client_msg_id=message.client_msg_id or "",
    )


def conversation_info(
    conv: Conversation, last_seq: int = 0, read_seq: int = 0
) -> f.ConversationInfo:
    return f.ConversationInfo(
        conv=conv.id,
        customer=conv.customer_id,
        state=conv.state.value,
        last_seq=last_seq,
        read_seq=read_seq,
        agent=conv.agent_id,
        group=conv.group_id,
        created_at=conv.created_at,
        context_type=conv.context_type,
        context=None if conv.context is None else msgspec.Raw(conv.context),
        labels=list(conv.labels),
        accepted=conv.accepted_at is not None,
        csat_score=conv.csat_score,
        successor=conv.successor_id,
    )


def agent_frame(state: AgentState, request_id: f.RequestId | None = None) -> f.AgentInfo:
    return f.AgentInfo(
        agent=state.id,
        status=state.status.value,
        connected=state.connections > 0,
        load=state.load,
        capacity=state.capacity,
        groups=sorted(state.groups),
        id=request_id,
    )


def message_json(message: StoredMessage) -> dict[str, Any]:
    """A stored message as webhook JSON."""
    return {
        "seq": message.seq,
        "msg_id": message.msg_id,
        "sender": message.sender,
        "sender_role": message.sender_role,
        "type": message.type,
        "body": msgspec.json.decode(message.body),
        "ts": message.ts,
        "visibility": message.visibility,
    }
