"""Every frame of wire protocol v1, as msgspec Structs.

Frames are JSON objects in WebSocket text frames; the ``op`` field names the frame.
Client frames may carry an ``id`` (string or integer) that the server copies into its
reply, so a client can match replies to requests. docs/protocol.md is the reference.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

PROTOCOL_VERSION = 1

# -- shared field types --------------------------------------------------------------------

RequestId = Annotated[str, msgspec.Meta(max_length=64)] | int
ConvId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
ClientMsgId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
UserId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
PageLimit = Annotated[int, msgspec.Meta(ge=1, le=1000)]
Url = Annotated[str, msgspec.Meta(min_length=1, max_length=2048, pattern=r"^https?://")]
Price = Annotated[str, msgspec.Meta(pattern=r"^\d{1,12}(\.\d{1,2})?$")]
Currency = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$")]
ShortText = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Dimension = Annotated[int, msgspec.Meta(ge=1, le=100_000)]

MessageType = Literal["text", "image", "order_card", "listing_card", "note", "system"]
CLIENT_MESSAGE_TYPES = ("text", "image", "order_card", "listing_card", "note")
#: Types visible to agents and admins only (never pushed, synced or shown to customers).
INTERNAL_MESSAGE_TYPES = frozenset({"note"})
GroupId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
Label = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=r"^[^\s,]+$")]
NoteText = Annotated[str, msgspec.Meta(max_length=2000)]
Role = Literal["customer", "agent", "admin"]

# -- message bodies (the ``body`` of a message, chosen by its ``type``) --------------------


class TextBody(msgspec.Struct, forbid_unknown_fields=True):
    text: Annotated[str, msgspec.Meta(min_length=1)]


class ImageBody(msgspec.Struct, forbid_unknown_fields=True):
    url: Url
    width: Dimension
    height: Dimension


class CardBody(msgspec.Struct, forbid_unknown_fields=True):
    """An order card or a listing card: what the buyer is asking about."""

    id: ShortText
    title: ShortText
    price: Price
    image_url: Url
    currency: Currency = "CNY"


class SystemBody(msgspec.Struct):
    """A system event (server-made only): ``event`` names it, ``data`` details it."""

    event: str
    data: dict[str, object] = {}


BODY_TYPES: dict[str, type[msgspec.Struct]] = {
    "text": TextBody,
    "image": ImageBody,
    "order_card": CardBody,
    "listing_card": CardBody,
    "note": TextBody,
    "system": SystemBody,
}

# -- client -> server ---------------------------------------------------------------------


class ClientFrame(msgspec.Struct, tag_field="op", forbid_unknown_fields=True, kw_only=True):
    id: RequestId | None = None


class Auth(ClientFrame, tag="auth"):
    token: Annotated[str, msgspec.Meta(min_length=1, max_length=8192)]


class Send(ClientFrame, tag="send"):
    conv: ConvId
    client_msg_id: ClientMsgId
    type: Literal["text", "image", "order_card", "listing_card", "note"]
    body: msgspec.Raw


class Sync(ClientFrame, tag="sync"):
    conv: ConvId
    after_seq: Seq = 0
    limit: PageLimit = 100


class History(ClientFrame, tag="history"):
    conv: ConvId
    before_seq: Seq | None = None
    limit: PageLimit = 50


class Read(ClientFrame, tag="read"):
    conv: ConvId
    seq: Seq


class Typing(ClientFrame, tag="typing"):
    conv: ConvId


class Ping(ClientFrame, tag="ping"):
    pass


class Open(ClientFrame, tag="open"):
    """Open a conversation. Customers open their own; agents/admins name the customer."""

    customer_id: UserId | None = None
    group: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    context: CardBody | None = None
    context_type: Literal["order_card", "listing_card"] | None = None


class ListConversations(ClientFrame, tag="convs"):
    pass


# -- customer service (see docs/protocol.md, "Customer service") ----------------------------


class SetStatus(ClientFrame, tag="status"):
    """An agent sets their status; answered by an ``agent`` frame."""

    status: Literal["online", "away", "offline"]


class Accept(ClientFrame, tag="accept"):
    conv: ConvId


class Pick(ClientFrame, tag="pick"):
    """An agent takes a queued conversation of their group (pool mode, or any mode)."""

    conv: ConvId


class Transfer(ClientFrame, tag="transfer"):
    """To another agent or to a group's queue (exactly one of ``agent`` and ``group``)."""

    conv: ConvId
    agent: UserId | None = None
    group: GroupId | None = None
    note: NoteText = ""


class Wait(ClientFrame, tag="wait"):
    """The agent waits on the customer (``assigned`` -> ``waiting``)."""

    conv: ConvId


class Resolve(ClientFrame, tag="resolve"):
    conv: ConvId


class Close(ClientFrame, tag="close"):
    conv: ConvId


class Rate(ClientFrame, tag="rate"):
    """The customer rates a resolved conversation (CSAT), once."""

    conv: ConvId
    score: Annotated[int, msgspec.Meta(ge=1, le=5)]
    comment: Annotated[str, msgspec.Meta(max_length=1000)] = ""


class SetLabels(ClientFrame, tag="labels"):
    conv: ConvId
    labels: Annotated[list[Label], msgspec.Meta(max_length=20)]


class Watch(ClientFrame, tag="watch"):
    """A supervisor watches a conversation read-only (``on=false`` stops)."""

    conv: ConvId
    on: bool = True


class Takeover(ClientFrame, tag="takeover"):
    """A supervisor makes themselves the conversation's agent."""

    conv: ConvId


class ListQueue(ClientFrame, tag="queue"):
    """The queue of a group (agents of the group, admins)."""

    group: GroupId


class ListCanned(ClientFrame, tag="canned"):
    """Canned responses of the agent's groups (of ``group`` when given)."""

    group: GroupId | None = None


ClientRequest = (
    Auth
    | Send
    | Sync
    | History
    | Read
    | Typing
    | Ping
    | Open
    | ListConversations
    | SetStatus
    | Accept
    | Pick
    | Transfer
    | Wait
    | Resolve
    | Close
    | Rate
    | SetLabels
    | Watch
    | Takeover
    | ListQueue
    | ListCanned
)

# -- server -> client ---------------------------------------------------------------------


class ServerFrame(msgspec.Struct, tag_field="op", omit_defaults=True, kw_only=True):
    pass


class Hello(ServerFrame, tag="hello"):
    user: str
    role: str
    session: str
    node: str
    heartbeat: float
    protocol: int


class Ack(ServerFrame, tag="ack"):
    conv: str
    client_msg_id: str
    msg_id: str
    seq: int
    ts: int
    id: RequestId | None = None
    duplicate: bool = False


class Error(ServerFrame, tag="error"):
    code: str
    message: str
    retryable: bool
    id: RequestId | None = None
    retry_after: float | None = None


class Message(ServerFrame, tag="message"):
    """A stored message: pushed live, and the element of ``messages`` pages."""

    conv: str
    seq: int
    msg_id: str
    sender: str
    sender_role: str
    type: str
    body: msgspec.Raw
    ts: int
    client_msg_id: str = ""


class Messages(ServerFrame, tag="messages"):
    conv: str
    messages: list[Message]
    has_more: bool
    id: RequestId | None = None
    last_seq: int = 0


class ReadReceipt(ServerFrame, tag="read"):
    conv: str
    user: str
    seq: int


class TypingNotice(ServerFrame, tag="typing"):
    conv: str
    user: str


class Ok(ServerFrame, tag="ok"):
    id: RequestId | None = None


class Pong(ServerFrame, tag="pong"):
    ts: int
    id: RequestId | None = None


class Notice(ServerFrame, tag="notice"):
    code: str
    text: str


class ConversationInfo(msgspec.Struct, omit_defaults=True):
    conv: str
    customer: str
    state: str
    last_seq: int
    read_seq: int = 0
    agent: str | None = None
    group: str | None = None
    created_at: int = 0
    context_type: str | None = None
    context: msgspec.Raw | None = None
    labels: list[str] = []
    accepted: bool = False
    csat_score: int | None = None
    successor: str | None = None


class Conversation(ServerFrame, tag="conversation"):
    conversation: ConversationInfo
    id: RequestId | None = None


class Conversations(ServerFrame, tag="conversations"):
    conversations: list[ConversationInfo]
    id: RequestId | None = None


class QueuePosition(ServerFrame, tag="queue_position"):
    """Pushed to a waiting customer whenever their place in the queue changes."""

    conv: str
    group: str
    position: int  # 1 = next; 0 when they left a message instead of waiting live
    estimated_wait: float | None = None  # seconds, None while unknown
    backlog: bool = False


class AgentInfo(ServerFrame, tag="agent"):
    """An agent's own state: pushed to all their connections when it changes."""

    agent: str
    status: str  # what they chose: online, away, offline
    connected: bool
    load: int
    capacity: int
    groups: list[str]
    id: RequestId | None = None


class QueueItem(msgspec.Struct, omit_defaults=True):
    conv: str
    customer: str
    position: int
    since: int
    backlog: bool = False


class Queue(ServerFrame, tag="queue"):
    group: str
    entries: list[QueueItem]
    id: RequestId | None = None


class CannedItem(msgspec.Struct, omit_defaults=True):
    id: str
    shortcut: str
    text: str
    group: str | None = None


class Canned(ServerFrame, tag="canned"):
    responses: list[CannedItem]
    id: RequestId | None = None


ServerEvent = (
    Hello
    | Ack
    | Error
    | Message
    | Messages
    | ReadReceipt
    | TypingNotice
    | Ok
    | Pong
    | Notice
    | Conversation
    | Conversations
    | QueuePosition
    | AgentInfo
    | Queue
    | Canned
)
