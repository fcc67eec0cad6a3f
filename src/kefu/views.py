"""Wire views of domain records: the frames that show a message or a conversation."""

from __future__ import annotations

import msgspec

from kefu.model import Conversation, StoredMessage
from kefu.protocol import frames as f


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
