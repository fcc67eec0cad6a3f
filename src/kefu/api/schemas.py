"""Request and response bodies of the REST API, as msgspec Structs (and so JSON Schema)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from kefu.protocol.frames import ConversationInfo, GroupId, Message, UserId
from kefu.reports import ReportRow

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Text = Annotated[str, msgspec.Meta(max_length=4000)]
# Bounds are checked by the desk so that the error names the rule (invalid_argument).
Capacity = int
Seconds = float


class ErrorBody(msgspec.Struct):
    code: str
    message: str


class ErrorResponse(msgspec.Struct):
    error: ErrorBody


class GroupIn(msgspec.Struct, forbid_unknown_fields=True):
    id: GroupId
    name: Name
    mode: Literal["auto", "pool"] = "auto"
    welcome: Text = ""
    max_queue: int = 0
    max_wait: Seconds = 0.0
    schedule: dict[str, Any] | None = None
    out_of_hours_message: Text = ""


class GroupPatch(msgspec.Struct, forbid_unknown_fields=True):
    name: Name | msgspec.UnsetType = msgspec.UNSET
    mode: Literal["auto", "pool"] | msgspec.UnsetType = msgspec.UNSET
    welcome: Text | msgspec.UnsetType = msgspec.UNSET
    max_queue: int | msgspec.UnsetType = msgspec.UNSET
    max_wait: Seconds | msgspec.UnsetType = msgspec.UNSET
    schedule: dict[str, Any] | msgspec.UnsetType | None = msgspec.UNSET
    out_of_hours_message: Text | msgspec.UnsetType = msgspec.UNSET


class GroupOut(msgspec.Struct):
    id: str
    name: str
    mode: str
    welcome: str
    max_queue: int
    max_wait: float
    schedule: dict[str, Any] | None
    out_of_hours_message: str
    created_at: int


class AgentIn(msgspec.Struct, forbid_unknown_fields=True):
    id: UserId
    name: Name
    groups: list[GroupId]
    capacity: Capacity = 10


class AgentPatch(msgspec.Struct, forbid_unknown_fields=True):
    name: Name | msgspec.UnsetType = msgspec.UNSET
    groups: list[GroupId] | msgspec.UnsetType = msgspec.UNSET
    capacity: Capacity | msgspec.UnsetType = msgspec.UNSET


class AgentOut(msgspec.Struct):
    id: str
    name: str
    capacity: int
    groups: list[str]
    created_at: int
    status: str  # live: online, away or offline
    load: int


class CannedIn(msgspec.Struct, forbid_unknown_fields=True):
    shortcut: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=4000)]
    group: GroupId | None = None


class CannedOut(msgspec.Struct):
    id: str
    group: str | None
    shortcut: str
    text: str
    created_at: int


class ConversationList(msgspec.Struct):
    conversations: list[ConversationInfo]
    #: Pass as ``before`` for the next page; absent on the last page.
    next_before: str | None = None


class ConversationDetail(msgspec.Struct):
    conversation: ConversationInfo
    labels: list[str]
    csat_comment: str | None
    timeline: dict[str, int | None]


class MessagePage(msgspec.Struct):
    conv: str
    messages: list[Message]
    has_more: bool
    last_seq: int


class GroupStats(msgspec.Struct):
    group: str
    queued: int
    left_messages: int
    longest_wait: float
    agents_online: int


class AgentStats(msgspec.Struct):
    agent: str
    status: str
    load: int
    capacity: int
    groups: list[str]


class LiveStats(msgspec.Struct):
    ts: int
    groups: list[GroupStats]
    agents: list[AgentStats]


class Report(msgspec.Struct):
    by: str
    start: int
    end: int
    rows: list[ReportRow]


class Deleted(msgspec.Struct):
    deleted: bool


class ClusterNode(msgspec.Struct):
    id: str
    #: The node's HTTP base URL, as it advertises it.
    url: str
    #: Its share of the ring.
    weight: float
    #: Authenticated connections: live for the answering node, as of the last heartbeat
    #: (every ``node_heartbeat`` seconds) for the others.
    connections: int
    #: Unix ms when it started.
    started: int
    #: ``node_id/random``, new at every start; null in embedded mode (no membership).
    incarnation: str | None


class ClusterInfo(msgspec.Struct):
    mode: Literal["embedded", "cluster"]
    #: The id of the node that answered.
    node: str
    #: The fingerprint of the ring (equal on every node that sees the same members).
    ring_version: str
    #: The live nodes on the ring, sorted by id.
    nodes: list[ClusterNode]
