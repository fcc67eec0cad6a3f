"""The help desk: conversation lifecycle, skill-group routing and the agent workflow.

The desk turns the lifecycle table (:mod:`kefu.lifecycle`) into behaviour. It decides; the
store records (every transition is a compare-and-set there, with its event message in the
same transaction) and the routing backend keeps the queues and the agents' load, taking
capacity atomically. Nothing here assumes one process: two nodes racing on one
conversation meet in the store's compare-and-set, and two nodes assigning from one queue
meet in the routing backend's atomic steps.

Background work, all in :meth:`Desk.tick` (every ``sweep_interval``) and the dispatcher:

* auto-assignment of each group's queue (woken by arrivals, agents coming online and
  capacity freed);
* agents gone for ``agent_offline_grace``: their conversations go back to the head of the
  queue, with a notice to the customer;
* the accept timeout: an unaccepted assignment goes to someone else;
* overflow: customers waiting past the group's ``max_wait`` are offered leave-a-message;
* customer inactivity: a warning, then the conversation is closed;
* queue positions and estimated waits, pushed to waiting customers when they change
  (:mod:`kefu.positions`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import msgspec

from kefu import ids, schedule, tasks
from kefu.broker import Broker
from kefu.config import Config
from kefu.errors import (
    ClusterError,
    ErrorCode,
    Forbidden,
    InvalidArgument,
    InvalidTransition,
    KefuError,
    NotFound,
    StoreError,
)
from kefu.lifecycle import ACTIVE_STATES, OPEN_STATES, Event, next_state, sources, target
from kefu.metrics import Metrics
from kefu.model import (
    Agent,
    AgentStatus,
    CannedResponse,
    Conversation,
    ConversationState,
    Group,
    NewMessage,
    Principal,
    Role,
    RoutingMode,
    StoredMessage,
    Visibility,
)
from kefu.positions import QUEUE_TOPIC, QueuePositions
from kefu.protocol import frames as f
from kefu.protocol.server import encode
from kefu.routing import AgentState, Assignment, QueueEntry, RoutingBackend, RoutingError
from kefu.routing import base as routing_base
from kefu.store.base import ConversationFilter, MessageStore
from kefu.views import agent_frame, conversation_info, message_frame, message_json
from kefu.webhooks import Webhooks

log = logging.getLogger(__name__)

SYSTEM = "system"
#: Longest pause between two scans for customers who stopped answering (seconds).
INACTIVITY_SCAN_MAX = 30.0
#: Seconds a customer refused by a full queue is told to wait before opening again.
QUEUE_FULL_RETRY_AFTER = 30.0
#: Most assignments recorded concurrently by one dispatch step.
DISPATCH_BATCH = 64
#: How long closing waits for the desk's tasks to stop.
CLOSE_TIMEOUT = 5.0


@dataclasses.dataclass(slots=True)
class _Gate:
    """A lock with a count of who holds or waits for it (dropped when nobody does)."""

    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    users: int = 0


class Desk:
    def __init__(
        self,
        config: Config,
        *,
        store: MessageStore,
        routing: RoutingBackend,
        broker: Broker,
        metrics: Metrics,
        webhooks: Webhooks,
    ) -> None:
        self.config = config
        self.settings = config.service
        self.store = store
        self.routing = routing
        self.broker = broker
        self.metrics = metrics
        self.webhooks = webhooks
        self.groups: dict[str, Group] = {}
        self.agents: dict[str, Agent] = {}
        #: Supervisors watching each conversation (on this node; see docs/operations.md).
        self.watchers: dict[str, set[str]] = {}
        self._dirty: set[str] = set()  # groups to dispatch
        self._wake = asyncio.Event()
        self.positions = QueuePositions(
            self.settings,
            routing=routing,
            broker=broker,
            metrics=metrics,
            owns=lambda kind, key: self.owns(kind, key),
        )
        self._warned: set[str] = set()
        self._inactivity_scanned = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._opening: dict[tuple[str, str], _Gate] = {}  # customer, group -> open in progress
        self._conv_gates: dict[str, _Gate] = {}  # conversation -> desk operation in progress
        self._closing = False
        self._unrouted: dict[str, int] = {}  # group -> opened, not yet queued
        #: Connections of agent users on this node, set up as agents or not (yet).
        self._connected_here: dict[str, int] = {}
        #: Whether this node runs a partition of the periodic work, ``(kind, key)``:
        #: ``("agent", id)``, ``("queue", group)``, ``("inactivity", conversation)``. One
        #: node alone runs everything; a cluster node asks the ring (kefu.cluster).
        self.owns: Callable[[str, str], bool] = lambda kind, key: True

    # -- life ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load groups and agents, rebuild the routing state from the store, start timers."""
        await self.routing.start()
        await self.reload()
        await self._recover(ids.now_ms(), starting=True)
        self.broker.on_announce(self._announced)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._dispatch_loop(), name="kefu-desk-dispatch"),
            loop.create_task(self.positions.run(), name="kefu-desk-positions"),
            loop.create_task(self._tick_loop(), name="kefu-desk-timers"),
        ]

    async def reload(self) -> None:
        """Read groups and agents from the store (at start, and when another node changed
        them) and configure the routing backend to match."""
        now = ids.now_ms()
        self.groups = {g.id: g for g in await self.store.list_groups()}
        default = self.settings.default_group
        if default not in self.groups:
            self.groups[default] = await self.store.save_group(Group(id=default, name=default))
        self.agents = {}
        for agent in await self.store.list_agents():
            self.agents[agent.id] = agent
            await self.routing.configure_agent(agent.id, agent.capacity, agent.groups, now)
        self._dirty.update(self.groups)
        self._wake.set()

    def _announced(self, topic: str, data: str) -> None:
        if topic == "desk":
            self._spawn(self.reload())
        elif topic == QUEUE_TOPIC:
            self.positions.announced(data)
        elif topic == "watch":  # another node's supervisor: their pushes come from here too
            try:
                conv_id, user, on = json.loads(data)
            except ValueError:  # pragma: no cover - only Kefu nodes announce
                return
            self._set_watching(str(conv_id), str(user), bool(on))

    def _set_watching(self, conv_id: str, user: str, on: bool) -> None:
        if on:
            self.watchers.setdefault(conv_id, set()).add(user)
            return
        users = self.watchers.get(conv_id, set())
        users.discard(user)
        if not users:
            self.watchers.pop(conv_id, None)

    async def _recover(self, now: int, *, starting: bool = False) -> None:
        """Build the routing state from the store when it is missing: at start-up (an empty
        process, or the first node of a cluster), or later when a shared routing state lost
        its data (Redis restarted empty). One node rebuilds it; every node reports its
        agents' connections again."""
        if await self.routing.claim_rebuild():
            if not starting:  # at start-up the groups and agents were just read
                log.warning("routing state missing: rebuilding it from the store")
                await self.reload()
            await self._rebuild(now)
            await self.routing.rebuilt()
        if await self.routing.needs_report():
            await self.routing.report(dict(self._connected_here), now)

    async def _rebuild(self, now: int) -> None:
        open_convs = await self.store.search_conversations(
            ConversationFilter(states=tuple(OPEN_STATES)), limit=1_000_000
        )
        for conv in sorted(open_convs, key=lambda c: c.created_at):
            if conv.state is ConversationState.QUEUED:
                left = conv.left_message_at is not None
                await self.routing.enqueue(self._entry(conv, since=conv.updated_at, backlog=left))
                self.positions.changed(self._group_of(conv))
            elif conv.agent_id is not None:
                await self.routing.reserve(conv.agent_id, conv.id, now, force=True)
                if conv.accepted_at is not None:
                    await self.routing.accepted(conv.agent_id, conv.id)

    async def close(self) -> None:
        # The flag stops the loops even where a library swallowed the cancellation.
        self._closing = True
        self._wake.set()
        self.positions.stop()
        await tasks.stop([*self._tasks, *self._background], timeout=CLOSE_TIMEOUT)
        self._tasks = []
        await self.routing.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)

    @contextlib.asynccontextmanager
    async def serialized(self, conv_id: str) -> AsyncIterator[None]:
        """One desk operation at a time per conversation: each reads the conversation,
        decides, and writes; two at once would decide on the same stale read. On one node
        a lock per conversation does it; in a cluster the holder also takes the routing
        backend's lock on the conversation (:meth:`RoutingBackend.exclusive`, which fails
        retryably with :class:`ClusterError` when it cannot be had). The store's
        compare-and-set stays the last arbiter, should a lock expire under a slow step."""
        gate = self._conv_gates.setdefault(conv_id, _Gate())
        gate.users += 1
        try:
            async with gate.lock, self.routing.exclusive(f"conv:{conv_id}"):
                yield
        finally:
            gate.users -= 1
            if not gate.users:
                del self._conv_gates[conv_id]

    async def _fresh(self, conv: Conversation) -> Conversation:
        """The newest known state of ``conv`` (taken inside :meth:`serialized`)."""
        cached = self.store.cached_conversation(conv.id)
        if cached is not None and cached.updated_at >= conv.updated_at:
            return cached
        found = await self.store.get_conversation(conv.id)
        return conv if found is None else found

    # -- helpers ------------------------------------------------------------------------------

    def _group_of(self, conv: Conversation) -> str:
        return conv.group_id or self.settings.default_group

    def _entry(
        self,
        conv: Conversation,
        *,
        since: int | None = None,
        prefer: str | None = None,
        excluded: frozenset[str] = frozenset(),
        backlog: bool = False,
    ) -> QueueEntry:
        return QueueEntry(
            conv=conv.id,
            customer=conv.customer_id,
            group=self._group_of(conv),
            since=ids.now_ms() if since is None else since,
            prefer=prefer,
            excluded=excluded,
            backlog=backlog,
        )

    def recipients(self, conv: Conversation, *, internal: bool) -> list[str]:
        """Who gets a push of this conversation: participants (not the customer for
        internal messages) and the supervisors watching it."""
        users = [] if internal else [conv.customer_id]
        if conv.agent_id is not None and conv.agent_id != conv.customer_id:
            users.append(conv.agent_id)
        watching = self.watchers.get(conv.id)
        if watching:
            users.extend(u for u in watching if u not in users)
        return users

    def push_message(self, conv: Conversation, message: StoredMessage, **kw: Any) -> None:
        self.broker.deliver(
            self.recipients(conv, internal=message.internal),
            encode(message_frame(message)),
            offline=True,
            **kw,
        )

    def push_conversation(
        self, conv: Conversation, last_seq: int, also: Iterable[str | None] = ()
    ) -> None:
        users = self.recipients(conv, internal=False)
        users += [u for u in also if u is not None and u not in users]
        self.metrics.push_kind("conversation").inc()
        info = conversation_info(conv, last_seq)
        self.broker.deliver(users, encode(f.Conversation(conversation=info)))

    async def push_current(self, conv: Conversation) -> None:
        """Push the conversation as it is now, with its last seq."""
        self.push_conversation(conv, await self.store.last_seq(conv.id))

    async def push_agent(self, agent_id: str) -> AgentState | None:
        state = await self.routing.agent(agent_id)
        if state is not None:
            self.broker.deliver([agent_id], encode(agent_frame(state)))
        return state

    def emit(self, kind: str, conv: Conversation, **data: Any) -> None:
        if not self.webhooks.settings.webhook_urls:
            return
        info = msgspec.json.decode(msgspec.json.encode(conversation_info(conv)))
        self.webhooks.emit(kind, conv.id, {"conversation": info, **data})

    async def _record(
        self,
        conv: Conversation,
        event: Event,
        *,
        actor: Principal | None = None,
        data: Mapping[str, Any] | None = None,
        if_agent: str | None = None,
        sets: Mapping[str, str | int | None] | None = None,
        stamps: Iterable[str] = (),
        first_stamps: Iterable[str] = (),
        also_notify: Iterable[str | None] = (),
    ) -> tuple[Conversation, str | None]:
        """Apply ``event`` (a compare-and-set in the store), push and emit it; returns the
        updated conversation and the agent the store says held it just before."""
        next_state(conv.state, event)  # refuse early what the table refuses
        body = msgspec.json.encode(
            {"event": event.value, "data": {**(data or {}), "state": target(event).value}}
        )
        updated, message, previous = await self.store.transition(
            conv.id,
            from_states=sources(event),
            to_state=target(event),
            event_body=body,
            sender=actor.user_id if actor else SYSTEM,
            sender_role=actor.role.value if actor else SYSTEM,
            if_agent=if_agent,
            sets=sets,
            stamps=tuple(stamps),
            first_stamps=tuple(first_stamps),
        )
        self.metrics.transitions.labels(event=event.value).inc()
        self.metrics.push_kind("message").inc()
        old = previous if previous != updated.agent_id else None
        self.push_message(updated, message)
        if old is not None:
            self.broker.deliver([old], encode(message_frame(message)))
        self.push_conversation(updated, message.seq, also=[old, *also_notify])
        self.emit(f"conversation.{event.value}", updated, event=message_json(message))
        return updated, previous

    async def _system_message(
        self, conv: Conversation, event: str, data: Mapping[str, Any]
    ) -> StoredMessage:
        """A system message that is not a transition (welcome, notices, warnings)."""
        stored = await self.store.append(
            NewMessage(
                conv=conv.id,
                sender=SYSTEM,
                sender_role=Role.SYSTEM,
                client_msg_id=None,
                type="system",
                body=msgspec.json.encode({"event": event, "data": dict(data)}),
            )
        )
        self.push_message(conv, stored)
        self.emit("message.created", conv, message=message_json(stored))
        return stored

    def group(self, group_id: str | None) -> Group:
        group = self.groups.get(group_id or self.settings.default_group)
        if group is None:
            raise NotFound(f"group {group_id!r} does not exist")
        return group

    def _require_agent(self, principal: Principal) -> None:
        if principal.role not in (Role.AGENT, Role.ADMIN):
            raise Forbidden("agents and admins only")

    def _require_holder(self, principal: Principal, conv: Conversation) -> str | None:
        """The compare-and-set guard for an agent acting on their conversation."""
        if principal.role is Role.ADMIN:
            return None
        self._require_agent(principal)
        if conv.agent_id != principal.user_id:
            raise Forbidden(f"conversation {conv.id!r} is not assigned to you")
        return principal.user_id

    async def conversation(self, conv_id: str) -> Conversation:
        conv = await self.store.get_conversation(conv_id)
        if conv is None:
            raise NotFound(f"conversation {conv_id!r} does not exist")
        return conv

    async def can_read(self, principal: Principal, conv: Conversation) -> bool:
        """Customers their own; agents theirs and their groups' queued ones; admins all."""
        if principal.role is Role.ADMIN:
            return True
        if principal.role is Role.CUSTOMER:
            return conv.customer_id == principal.user_id
        if conv.agent_id == principal.user_id:
            return True
        agent = self.agents.get(principal.user_id)
        return (
            agent is not None
            and conv.state is ConversationState.QUEUED
            and self._group_of(conv) in agent.groups
        )

    # -- presence and status ------------------------------------------------------------------

    async def agent_connected(self, principal: Principal) -> None:
        if principal.role is not Role.AGENT:
            return
        user = principal.user_id
        self._connected_here[user] = self._connected_here.get(user, 0) + 1
        state = await self.routing.connected(user, ids.now_ms())
        if state is not None:
            self._agent_changed(state)
            self.broker.deliver([state.id], encode(agent_frame(state)))

    async def agent_disconnected(self, principal: Principal, remaining: int) -> None:
        """One of the user's connections on this node closed (``remaining`` left here)."""
        if principal.role is Role.ADMIN:
            if remaining == 0:  # watching ends with the supervisor's last connection
                for conv in [c for c, users in self.watchers.items() if principal.user_id in users]:
                    self._set_watching(conv, principal.user_id, False)
                    self.broker.announce("watch", json.dumps([conv, principal.user_id, False]))
            return
        if principal.role is not Role.AGENT:
            return
        left = self._connected_here.pop(principal.user_id, 0) - 1
        if left > 0:
            self._connected_here[principal.user_id] = left
        state = await self.routing.disconnected(principal.user_id, ids.now_ms())
        if state is not None:
            self._agent_changed(state)

    def _agent_changed(self, state: AgentState) -> None:
        self._dirty.update(state.groups)
        self._wake.set()
        self.positions.changed(*state.groups)  # estimated waits depend on who is online

    async def set_status(self, principal: Principal, status: AgentStatus) -> AgentState:
        if principal.role is not Role.AGENT:
            raise Forbidden("only agents have a status")
        if principal.user_id not in self.agents:
            raise NotFound(f"agent {principal.user_id!r} is not set up (ask an admin)")
        state = await self.routing.set_status(principal.user_id, status, ids.now_ms())
        if status is AgentStatus.OFFLINE:
            await self._requeue_all(principal.user_id, reason="agent_offline")
        self._agent_changed(state)
        return await self.push_agent(principal.user_id) or state

    async def _requeue_all(self, agent_id: str, *, reason: str) -> None:
        state = await self.routing.agent(agent_id)
        for conv_id in sorted(state.active if state else ()):
            with contextlib.suppress(KefuError):
                conv = await self.conversation(conv_id)
                try:
                    await self.requeue(conv, reason=reason, head=True, if_agent=agent_id)
                except InvalidTransition:  # not theirs any more, or not active: let it go
                    await self.routing.release(agent_id, conv_id, ids.now_ms())

    # -- opening --------------------------------------------------------------------------------

    async def open_for_customer(
        self,
        principal: Principal,
        group_id: str | None,
        context_type: str | None,
        context: bytes | None,
    ) -> tuple[Conversation, bool]:
        """The customer's open conversation in the group, or a new one (True: then call
        :meth:`route_opened` once the customer has the reply)."""
        group = self.group(group_id)
        # One at a time per customer and group: two tabs opening at once get one
        # conversation, not two (the search and the create are separate steps).
        key = (principal.user_id, group.id)
        gate = self._opening.setdefault(key, _Gate())
        gate.users += 1
        try:
            # ... and across nodes (a no-op on one node).
            async with gate.lock, self.routing.exclusive(f"open:{principal.user_id}:{group.id}"):
                return await self._open_for_customer(principal, group, context_type, context)
        finally:
            gate.users -= 1
            if not gate.users:
                del self._opening[key]

    async def _open_for_customer(
        self,
        principal: Principal,
        group: Group,
        context_type: str | None,
        context: bytes | None,
    ) -> tuple[Conversation, bool]:
        existing = await self.store.search_conversations(
            ConversationFilter(
                customer_id=principal.user_id, group_id=group.id, states=tuple(OPEN_STATES)
            ),
            limit=1,
        )
        if existing:
            return existing[0], False
        queued = await self.routing.queue_length(group.id)
        if queued + self._unrouted.get(group.id, 0) >= self.settings.max_queued:
            self.metrics.queue_refused.labels(group=group.id).inc()
            raise KefuError(
                f"the queue of group {group.id!r} is full: try again later",
                code=ErrorCode.OVERLOADED,
                retry_after=QUEUE_FULL_RETRY_AFTER,
            )
        # Counted from here until route_opened queues it: concurrent opens see each other.
        self._unrouted[group.id] = self._unrouted.get(group.id, 0) + 1
        try:
            conv = await self.store.create_conversation(
                customer_id=principal.user_id,
                group_id=group.id,
                context_type=context_type,
                context=context,
            )
        except BaseException:
            self._routed(group.id)
            raise
        self.emit("conversation.created", conv)
        return conv, True

    def _routed(self, group_id: str) -> None:
        left = self._unrouted.get(group_id, 0) - 1
        if left > 0:
            self._unrouted[group_id] = left
        else:
            self._unrouted.pop(group_id, None)

    async def route_opened(self, conv: Conversation) -> None:
        """Welcome and queue a conversation that a customer has just opened."""
        group = self.group(conv.group_id)
        queued = False  # counted as opening until the queue holds it

        def now_queued() -> None:
            nonlocal queued
            queued = True
            self._routed(group.id)

        try:
            prefer = await self.store.latest_agent(conv.customer_id)
            await self._route_new(conv, group, prefer=prefer, on_queued=now_queued)
        finally:
            if not queued:
                self._routed(group.id)

    async def _route_new(
        self,
        conv: Conversation,
        group: Group,
        *,
        prefer: str | None,
        data: Any = None,
        on_queued: Callable[[], None] | None = None,
    ) -> None:
        """Welcome the customer and queue the conversation (live or as a left message)."""
        await self._system_message(conv, "queued", {"group": group.id, **(data or {})})
        if group.welcome:
            await self._system_message(conv, "welcome", {"text": group.welcome})
        backlog_reason = await self._backlog_reason(group)
        entry = self._entry(conv, prefer=prefer, backlog=backlog_reason is not None)
        await self.routing.enqueue(entry)
        if on_queued is not None:
            on_queued()
        if backlog_reason is not None:
            text = group.out_of_hours_message if backlog_reason == "out_of_hours" else ""
            await self._offer_leave_message(conv, backlog_reason, text)
        self._queue_changed(group.id)

    async def _backlog_reason(self, group: Group) -> str | None:
        if not schedule.is_open(group.schedule, dt.datetime.now(dt.UTC)):
            return "out_of_hours"
        agents = await self.routing.agents()
        if not any(group.id in a.groups and a.effective is AgentStatus.ONLINE for a in agents):
            return "no_agents"
        if (
            group.max_queue
            and len([e for e in await self.routing.queue(group.id) if not e.backlog])
            >= group.max_queue
        ):
            return "queue_full"
        return None

    async def _offer_leave_message(self, conv: Conversation, reason: str, text: str) -> None:
        self.metrics.timer_actions.labels(kind="overflow").inc()
        await self.store.mark_left_message(conv.id)  # a restart keeps it a left message
        default = {
            "out_of_hours": "We are closed now. Leave a message and we will answer when we open.",
            "no_agents": "No agent is available now. Leave a message and we will answer soon.",
            "queue_full": "All agents are busy. Leave a message and we will answer soon.",
            "max_wait": "Sorry for the wait. Leave a message and we will answer soon.",
        }
        await self._system_message(
            conv, "leave_message", {"reason": reason, "text": text or default[reason]}
        )

    async def open_by_agent(
        self,
        principal: Principal,
        customer_id: str,
        group_id: str | None,
        context_type: str | None,
        context: bytes | None,
    ) -> Conversation:
        """An agent starts a conversation with a customer: assigned to them at once."""
        self._require_agent(principal)
        if group_id is not None:
            self.group(group_id)
        agent_id = principal.user_id if principal.role is Role.AGENT else None
        conv = await self.store.create_conversation(
            customer_id=customer_id,
            agent_id=agent_id,
            group_id=group_id,
            context_type=context_type,
            context=context,
        )
        if agent_id is not None:
            await self.routing.reserve(agent_id, conv.id, ids.now_ms(), force=True)
            await self.routing.accepted(agent_id, conv.id)
            await self.push_agent(agent_id)
        self.emit("conversation.created", conv)
        return conv

    # -- messages -------------------------------------------------------------------------------

    async def before_customer_message(
        self, principal: Principal, conv: Conversation
    ) -> Conversation:
        """Where a customer message goes: reopen, answer a wait, or continue a closed one."""
        async with self.serialized(conv.id):
            conv = await self._fresh(conv)
            if conv.state is ConversationState.WAITING:
                replied, _ = await self._record(conv, Event.CUSTOMER_REPLY, actor=principal)
                return replied
            if conv.state is ConversationState.RESOLVED:
                window = self.settings.reopen_window * 1000
                # strictly within: a window of 0 never reopens (even in the resolve's ms)
                if conv.resolved_at is not None and ids.now_ms() - conv.resolved_at < window:
                    return await self._reopen(conv, principal)
                conv, _ = await self._record(
                    conv,
                    Event.CLOSE,
                    data={"reason": "expired"},
                    sets={"close_reason": "expired"},
                    stamps=["closed_at"],
                )
        if conv.state is ConversationState.CLOSED or conv.successor_id is not None:
            target = await self.continue_closed(conv)
            # the one it continues in may itself wait on the customer: same rules there
            return await self.before_customer_message(principal, target)
        return conv

    async def conversation_fresh(self, conv_id: str) -> Conversation:
        conv = await self.store.get_conversation(conv_id, fresh=True)
        if conv is None:
            raise NotFound(f"conversation {conv_id!r} does not exist")
        return conv

    async def _reopen(self, conv: Conversation, actor: Principal) -> Conversation:
        agent = conv.agent_id
        now = ids.now_ms()
        held = agent is not None and await self.routing.holds(agent, conv.id)
        if agent is not None and (held or await self.routing.reserve(agent, conv.id, now)):
            try:
                updated, _ = await self._record(
                    conv,
                    Event.REOPEN_TO_AGENT,
                    actor=actor,
                    data={"agent": agent},
                    sets={"accepted_at": None},
                    stamps=["assigned_at"],
                )
            except KefuError:
                if not held:  # give back only the slot this call took
                    await self.routing.release(agent, conv.id, now)
                raise
            await self.push_agent(agent)
            return updated
        updated, _ = await self._record(
            conv, Event.REOPEN, actor=actor, sets={"agent_id": None, "accepted_at": None}
        )
        await self.routing.enqueue(self._entry(updated, prefer=agent))
        self._queue_changed(self._group_of(updated))
        return updated

    async def continue_closed(self, conv: Conversation) -> Conversation:
        """The open conversation that continues a closed one: the customer's open one in
        the same group if there is one, else its successor (created on first need)."""
        group = self.groups.get(self._group_of(conv)) or self.group(None)
        key = (conv.customer_id, group.id)
        gate = self._opening.setdefault(key, _Gate())
        gate.users += 1
        try:
            # The same gate and cluster lock as open: one open conversation per group.
            async with gate.lock, self.routing.exclusive(f"open:{conv.customer_id}:{group.id}"):
                fresh = await self.conversation_fresh(conv.id)
                if fresh.successor_id is None:
                    existing = await self.store.search_conversations(
                        ConversationFilter(
                            customer_id=conv.customer_id,
                            group_id=group.id,
                            states=tuple(OPEN_STATES),
                        ),
                        limit=1,
                    )
                    if existing:  # that one continues it: recorded, so resends land there too
                        await self.store.link_successor(conv.id, existing[0].id)
                while True:
                    successor, created = await self.store.successor(conv.id)
                    if created:
                        self.emit("conversation.created", successor, previous=conv.id)
                        await self._route_new(
                            successor,
                            group,
                            prefer=successor.previous_agent_id,
                            data={"previous": conv.id},
                        )
                        await self.push_current(successor)
                    if successor.state is not ConversationState.CLOSED:
                        return successor
                    conv = successor  # that one was closed too: follow the chain
        finally:
            gate.users -= 1
            if not gate.users:
                del self._opening[key]

    def message_stored(
        self, principal: Principal, conv: Conversation, stored: StoredMessage
    ) -> None:
        """After a client's message is stored: response stamps, timers, webhooks."""
        if principal.role is Role.CUSTOMER:
            self._warned.discard(conv.id)
        elif (
            not stored.internal
            and conv.agent_id == principal.user_id
            and (conv.first_response_at is None or conv.accepted_at is None)
            and not stored.duplicate
        ):  # the holder's first reply (since the assignment) accepts it
            self._spawn(self._first_response(conv, principal.user_id))
        if not stored.duplicate and self.webhooks.settings.webhook_urls:
            self.emit("message.created", conv, message=message_json(stored))

    async def _first_response(self, conv: Conversation, agent_id: str) -> None:
        updated = await self.store.stamp_response(conv.id, agent_id)
        await self.routing.accepted(agent_id, conv.id)
        if updated is not None and conv.accepted_at is None:
            await self.push_current(updated)

    # -- agent actions ----------------------------------------------------------------------------

    async def accept(self, principal: Principal, conv: Conversation) -> Conversation:
        async with self.serialized(conv.id):
            conv = await self._fresh(conv)
            guard = self._require_holder(principal, conv)
            if conv.accepted_at is not None:
                raise InvalidTransition("you have accepted this conversation already")
            updated, _ = await self._record(
                conv, Event.ACCEPT, actor=principal, if_agent=guard, stamps=["accepted_at"]
            )
            if updated.agent_id is not None:
                await self.routing.accepted(updated.agent_id, conv.id)
            return updated

    async def pick(self, principal: Principal, conv_id: str) -> Conversation:
        if principal.role is not Role.AGENT:
            raise Forbidden("only agents pick conversations")
        async with self.serialized(conv_id):
            conv = await self.conversation(conv_id)
            next_state(conv.state, Event.PICK)
            try:
                assignment = await self.routing.pick(principal.user_id, conv_id, ids.now_ms())
            except RoutingError as exc:
                raise KefuError(exc.message, code=exc.code) from None
            return await self._apply_locked(assignment, conv, Event.PICK, actor=principal)

    async def transfer(
        self,
        principal: Principal,
        conv: Conversation,
        *,
        agent_id: str | None,
        group_id: str | None,
        note: str,
    ) -> Conversation:
        if (agent_id is None) == (group_id is None):
            raise InvalidArgument("transfer to exactly one of agent and group")
        async with self.serialized(conv.id):
            conv = await self._fresh(conv)
            guard = self._require_holder(principal, conv)
            if agent_id is not None:
                updated = await self._transfer_to_agent(principal, conv, agent_id, guard)
            else:
                assert group_id is not None
                group = self.group(group_id)
                updated = await self._requeue(
                    conv,
                    reason="transfer",
                    group=group.id,
                    actor=principal,
                    if_agent=guard,
                    head=True,
                    # someone else, if anyone is free: they are passing it on
                    exclude=[conv.agent_id] if conv.agent_id else [],
                )
            if note:
                stored = await self.store.append(
                    NewMessage(
                        conv=conv.id,
                        sender=principal.user_id,
                        sender_role=principal.role,
                        client_msg_id=None,
                        type="note",
                        body=msgspec.json.encode({"text": note}),
                        visibility=Visibility.INTERNAL,
                    )
                )
                self.push_message(updated, stored)
                self.emit("message.created", updated, message=message_json(stored))
            return updated

    async def _transfer_to_agent(
        self, principal: Principal, conv: Conversation, agent_id: str, guard: str | None
    ) -> Conversation:
        if agent_id not in self.agents:
            raise NotFound(f"agent {agent_id!r} does not exist")
        if agent_id == conv.agent_id:
            raise InvalidTransition("the conversation is assigned to that agent already")
        next_state(conv.state, Event.TRANSFER)
        now = ids.now_ms()
        queued = await self.routing.dequeue(conv.id)
        if not await self.routing.move(conv.id, conv.agent_id, agent_id, now):
            if queued is not None:
                await self.routing.enqueue(queued, head=True)
            raise KefuError(
                f"agent {agent_id!r} is not online or at capacity",
                code=ErrorCode.AGENT_UNAVAILABLE,
            )
        try:
            updated, previous = await self._record(
                conv,
                Event.TRANSFER,
                actor=principal,
                data={"from": conv.agent_id, "to": agent_id},
                if_agent=guard,
                sets={"agent_id": agent_id, "accepted_at": None},
                stamps=["assigned_at"],
                first_stamps=["first_assigned_at"],
            )
        except KefuError:  # the store said no: put the routing state back as it was
            await self.routing.release(agent_id, conv.id, now)
            if conv.agent_id is not None and conv.state in ACTIVE_STATES:
                await self.routing.reserve(conv.agent_id, conv.id, now, force=True)
                if conv.accepted_at is not None:
                    await self.routing.accepted(conv.agent_id, conv.id)
            if queued is not None:
                await self.routing.enqueue(queued, head=True)
            raise
        if previous is not None:
            await self.push_agent(previous)
        await self.push_agent(agent_id)
        self.metrics.assignments.labels(how="transfer").inc()
        self._queue_changed(self._group_of(conv))
        return updated

    async def requeue(
        self,
        conv: Conversation,
        *,
        reason: str,
        head: bool,
        if_agent: str | None = None,
    ) -> Conversation:
        """Back to its queue's head (an agent went offline or missed the accept)."""
        async with self.serialized(conv.id):
            conv = await self._fresh(conv)
            return await self._requeue(conv, reason=reason, head=head, if_agent=if_agent)

    async def _requeue(
        self,
        conv: Conversation,
        *,
        reason: str,
        head: bool,
        group: str | None = None,
        actor: Principal | None = None,
        if_agent: str | None = None,
        exclude: Iterable[str] = (),
    ) -> Conversation:
        """Back to a queue (its own or ``group``), at the head: the customer waited already.

        Its wait starts again now (``max_wait`` counts from here); reports keep the first
        wait, from the conversation's creation to its first assignment.
        """
        sets: dict[str, str | int | None] = {"agent_id": None, "accepted_at": None}
        if group is not None:
            sets["group_id"] = group
        data: dict[str, Any] = {"reason": reason, "from": conv.agent_id}
        if group is not None:
            data["group"] = group
        updated, previous = await self._record(
            conv, Event.REQUEUE, actor=actor, data=data, if_agent=if_agent, sets=sets
        )
        now = ids.now_ms()
        if previous is not None:
            await self.routing.release(previous, conv.id, now)
            self._spawn(self.push_agent(previous))
        await self.routing.enqueue(
            self._entry(updated, since=now, excluded=frozenset(exclude)), head=head
        )
        self._queue_changed(self._group_of(updated))
        return updated

    async def wait(self, principal: Principal, conv: Conversation) -> Conversation:
        async with self.serialized(conv.id):
            conv = await self._fresh(conv)
            guard = self._require_holder(principal, conv)
            waiting, _ = await self._record(conv, Event.WAIT, actor=principal, if_agent=guard)
            return waiting

    async def resolve(self, principal: Principal, conv: Conversation) -> Conversation:
        async with self.serialized(conv.id):
            conv = await self._fresh(conv)
            guard = self._require_holder(principal, conv)
            updated, previous = await self._record(
                conv, Event.RESOLVE, actor=principal, if_agent=guard, stamps=["resolved_at"]
            )
            await self._let_go(conv, previous)
            return updated

    async def close_conversation(
        self, principal: Principal | None, conv: Conversation, *, reason: str
    ) -> Conversation:
        async with self.serialized(conv.id):
            conv = await self._fresh(conv)
            guard = None
            if principal is not None and principal.role is Role.AGENT:
                guard = self._require_holder(principal, conv)
            updated, previous = await self._record(
                conv,
                Event.CLOSE,
                actor=principal,
                data={"reason": reason},
                if_agent=guard,
                sets={"close_reason": reason},
                stamps=["closed_at"],
            )
            await self._let_go(conv, previous)
            return updated

    async def _let_go(self, conv: Conversation, holder: str | None) -> None:
        """The conversation no longer takes an agent's capacity nor a queue place."""
        self._warned.discard(conv.id)
        if await self.routing.dequeue(conv.id) is not None:
            self._queue_changed(self._group_of(conv))
        if holder is not None:
            await self.routing.release(holder, conv.id, ids.now_ms())
            await self.push_agent(holder)
            self._dirty.add(self._group_of(conv))
            self._wake.set()

    async def takeover(self, principal: Principal, conv: Conversation) -> Conversation:
        if principal.role is not Role.ADMIN:
            raise Forbidden("only supervisors take over conversations")
        async with self.serialized(conv.id):
            conv = await self._fresh(conv)
            if conv.agent_id == principal.user_id:
                raise InvalidTransition("you hold this conversation already")
            updated, previous = await self._record(
                conv,
                Event.TAKEOVER,
                actor=principal,
                data={"from": conv.agent_id, "to": principal.user_id},
                sets={"agent_id": principal.user_id},
                stamps=["assigned_at", "accepted_at"],
                first_stamps=["first_assigned_at"],
            )
            if await self.routing.dequeue(conv.id) is not None:
                self._queue_changed(self._group_of(conv))
            if previous is not None:
                await self.routing.release(previous, conv.id, ids.now_ms())
                await self.push_agent(previous)
            self.metrics.assignments.labels(how="takeover").inc()
            return updated

    async def watch(self, principal: Principal, conv: Conversation, on: bool) -> None:
        if principal.role is not Role.ADMIN:
            raise Forbidden("only supervisors watch conversations")
        self._set_watching(conv.id, principal.user_id, on)
        self.broker.announce("watch", json.dumps([conv.id, principal.user_id, on]))

    async def rate(
        self, principal: Principal, conv_id: str, score: int, comment: str
    ) -> Conversation:
        if principal.role is not Role.CUSTOMER:
            raise Forbidden("only the customer rates a conversation")
        updated = await self.store.rate(conv_id, principal.user_id, score, comment)
        await self.push_current(updated)
        self.emit("conversation.rated", updated, score=score, comment=comment)
        return updated

    async def set_labels(
        self, principal: Principal, conv: Conversation, labels: list[str]
    ) -> Conversation:
        self._require_agent(principal)
        if principal.role is Role.AGENT and conv.agent_id != principal.user_id:
            raise Forbidden(f"conversation {conv.id!r} is not assigned to you")
        updated = await self.store.set_labels(conv.id, labels)
        await self.push_current(updated)
        self.emit("conversation.labels", updated)
        return updated

    async def queue_of(self, principal: Principal, group_id: str) -> list[QueueEntry]:
        self._require_agent(principal)
        group = self.group(group_id)
        if principal.role is Role.AGENT and group.id not in self._agent(principal).groups:
            raise KefuError(f"you are not in group {group.id!r}", code=ErrorCode.NOT_MEMBER)
        return await self.routing.queue(group.id)

    def _agent(self, principal: Principal) -> Agent:
        agent = self.agents.get(principal.user_id)
        if agent is None:
            raise NotFound(f"agent {principal.user_id!r} is not set up (ask an admin)")
        return agent

    async def canned(self, principal: Principal, group_id: str | None) -> list[CannedResponse]:
        self._require_agent(principal)
        if principal.role is Role.ADMIN:
            return await self.store.list_canned(None if group_id is None else [group_id])
        groups = self._agent(principal).groups
        if group_id is not None:
            if group_id not in groups:
                raise KefuError(f"you are not in group {group_id!r}", code=ErrorCode.NOT_MEMBER)
            groups = (group_id,)
        return await self.store.list_canned(groups)

    # -- administration -------------------------------------------------------------------------

    async def save_group(self, group: Group) -> Group:
        if group.max_queue < 0 or group.max_queue > 1_000_000:
            raise InvalidArgument("max_queue must be 0..1000000 (0: no cap)")
        if group.max_wait < 0 or group.max_wait > 7 * 86400:
            raise InvalidArgument("max_wait must be 0..604800 seconds (0: no limit)")
        group = dataclasses.replace(group, schedule=schedule.validate(group.schedule))
        saved = await self.store.save_group(group)
        self.groups[saved.id] = saved
        self.broker.announce("desk")
        self._dirty.add(saved.id)
        self._wake.set()
        return saved

    async def save_agent(self, agent: Agent) -> Agent:
        if not 1 <= agent.capacity <= self.settings.max_capacity:
            raise InvalidArgument(f"capacity must be 1..{self.settings.max_capacity}")
        unknown = [g for g in agent.groups if g not in self.groups]
        if unknown:
            raise NotFound(f"groups {unknown} do not exist")
        saved = await self.store.save_agent(agent)
        self.agents[saved.id] = saved
        self.broker.announce("desk")
        now = ids.now_ms()
        new = await self.routing.agent(saved.id) is None
        await self.routing.configure_agent(saved.id, saved.capacity, saved.groups, now)
        if new:  # set up while connected: the connections made before count from now on
            for _ in range(self._connected_here.get(saved.id, 0)):
                await self.routing.connected(saved.id, now)
        state = await self.push_agent(saved.id)
        if state is not None:
            self._agent_changed(state)
        return saved

    # -- assignment -----------------------------------------------------------------------------

    async def _apply(
        self,
        a: Assignment,
        conv: Conversation | None,
        event: Event,
        *,
        actor: Principal | None = None,
    ) -> Conversation:
        """Record an assignment the routing backend made; undo it if the store refuses."""
        entered = False
        try:
            async with self.serialized(a.conv):
                entered = True
                return await self._apply_locked(a, conv, event, actor=actor)
        except ClusterError:
            if not entered:  # the conversation's lock was not to be had: give it back
                with contextlib.suppress(KefuError):
                    now = ids.now_ms()
                    await self.routing.release(a.agent, a.conv, now)
                    await self._requeue_unassigned(a, conv, now)
            raise

    async def _requeue_unassigned(self, a: Assignment, conv: Conversation | None, now: int) -> None:
        """Put an assignment's conversation back at the head of its queue, unless something
        else moved it on meanwhile."""
        current = await (self.conversation(a.conv) if conv is None else self._fresh(conv))
        if current.state is ConversationState.QUEUED:
            entry = self._entry(current, since=now - a.waited)
            await self.routing.enqueue(entry, head=True)
            self._queue_changed(a.group)

    async def _apply_locked(
        self,
        a: Assignment,
        conv: Conversation | None,
        event: Event,
        *,
        actor: Principal | None = None,
    ) -> Conversation:
        now = ids.now_ms()
        held = await self.routing.holds(a.agent, a.conv)
        if held:
            # The agent went offline after the routing picked them (their requeue may be
            # waiting on a read): give it back now rather than assign and requeue it.
            state = await self.routing.agent(a.agent)
            if state is None or state.status is AgentStatus.OFFLINE:
                await self.routing.release(a.agent, a.conv, now)
                held = False
        if not held:
            # Released while this waited for the conversation (the agent went offline):
            # put it back where it was, unless something else moved it on meanwhile.
            self.metrics.assignment_failures.labels(reason="released").inc()
            await self._requeue_unassigned(a, conv, now)
            raise InvalidTransition(f"the assignment of {a.conv!r} was undone meanwhile")
        try:
            conv = await (self.conversation(a.conv) if conv is None else self._fresh(conv))
            updated, _ = await self._record(
                conv,
                event,
                actor=actor,
                data={"agent": a.agent, "group": a.group, "waited_ms": a.waited},
                sets={"agent_id": a.agent, "accepted_at": None},
                stamps=["assigned_at"],
                first_stamps=["first_assigned_at"],
            )
        except InvalidTransition:  # closed meanwhile: nothing to assign
            self.metrics.assignment_failures.labels(reason="invalid_transition").inc()
            await self.routing.release(a.agent, a.conv, now)
            raise
        except BaseException:
            self.metrics.assignment_failures.labels(reason="store").inc()
            await self.routing.release(a.agent, a.conv, now)
            if conv is not None and conv.state is ConversationState.QUEUED:
                await self.routing.enqueue(self._entry(conv, since=now - a.waited), head=True)
            raise
        self.metrics.assignments.labels(how="pick" if event is Event.PICK else "auto").inc()
        self.positions.assigned(a.group, now)
        self._queue_changed(a.group)
        await self.push_agent(a.agent)
        return updated

    def _queue_changed(self, group: str) -> None:
        self._dirty.add(group)
        self._wake.set()
        self.positions.changed(group)

    async def dispatch(self, group_id: str) -> int:
        """Assign what can be assigned in the group now; returns how many."""
        group = self.groups.get(group_id)
        if group is None or group.mode is RoutingMode.POOL:
            return 0
        if not schedule.is_open(group.schedule, dt.datetime.now(dt.UTC)):
            return 0  # left messages wait for opening time (the timers retry every tick)
        count = 0
        while True:
            # Take what can be assigned now, then record it all at once: the transitions
            # share group commits instead of waiting for one commit each.
            batch: list[Assignment] = []
            while len(batch) < DISPATCH_BATCH:
                a = await self.routing.assign_next(group_id, ids.now_ms())
                if a is None:
                    break
                batch.append(a)
            if not batch:
                return count
            results = await asyncio.gather(
                *(self._apply(a, None, Event.ASSIGN) for a in batch), return_exceptions=True
            )
            failed: BaseException | None = None
            for result in results:
                if not isinstance(result, BaseException):
                    count += 1
                elif not isinstance(result, InvalidTransition) and failed is None:
                    failed = result  # each was undone by _apply; retried with backoff
            if failed is not None:
                raise failed

    async def _dispatch_loop(self) -> None:
        backoff = 0.05
        while not self._closing:
            await self._wake.wait()
            if self._closing:
                return
            self._wake.clear()
            groups, self._dirty = self._dirty, set()
            for group in sorted(groups):
                try:
                    await self.dispatch(group)
                    backoff = 0.05
                except (StoreError, ClusterError, OSError) as exc:
                    tasks.stop_if_cancelled()
                    log.warning("dispatch of %s failed (%s): retrying", group, exc)
                    self._dirty.add(group)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    self._wake.set()
                except Exception:
                    tasks.stop_if_cancelled()
                    log.exception("dispatch of %s failed", group)

    # -- timers -----------------------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                await self.tick()
            except Exception:
                tasks.stop_if_cancelled()
                log.exception("desk timers failed")

    async def tick(self) -> None:
        """Run every timer once: gone agents, accept timeouts, overflow, inactivity."""
        now = ids.now_ms()
        s = self.settings
        await self._recover(now)
        owns = self.owns
        agents = await self.routing.agents()  # one snapshot for both agent timers
        for agent_id in routing_base.gone(agents, int(s.agent_offline_grace * 1000), now):
            if owns("agent", agent_id):
                self.metrics.timer_actions.labels(kind="agent_offline").inc()
                await self._requeue_all(agent_id, reason="agent_offline")
        if s.accept_timeout:
            for agent_id, conv_id in routing_base.unaccepted_since(
                agents, now - int(s.accept_timeout * 1000)
            ):
                if owns("agent", agent_id):
                    await self._accept_timeout(agent_id, conv_id)
        for group in list(self.groups.values()):
            if group.max_wait and owns("queue", group.id):
                for entry in await self.routing.move_to_backlog(
                    group.id, now - int(group.max_wait * 1000)
                ):
                    with contextlib.suppress(KefuError):
                        conv = await self.conversation(entry.conv)
                        await self._offer_leave_message(conv, "max_wait", "")
                    self._queue_changed(group.id)
        # The inactivity scan reads every active conversation's last message: run it a
        # tenth of the warning time apart (at most every 30 s), not on every tick.
        period = min(INACTIVITY_SCAN_MAX, s.inactivity_warning / 10) * 1000
        if s.inactivity_close and now - self._inactivity_scanned >= period:
            self._inactivity_scanned = now
            await self._inactivity(now)
        self._dirty.update(g for g in await self.routing.queued_groups() if owns("queue", g))
        self._wake.set()

    async def _accept_timeout(self, agent_id: str, conv_id: str) -> None:
        self.metrics.timer_actions.labels(kind="accept_timeout").inc()
        async with self.serialized(conv_id):
            try:
                conv = await self.conversation_fresh(conv_id)
            except NotFound:
                await self.routing.release(agent_id, conv_id, ids.now_ms())
                return
            if conv.agent_id != agent_id or conv.accepted_at is not None:
                await self.routing.accepted(agent_id, conv_id)  # accepted or moved on: fine
                return
            try:
                await self._requeue(conv, reason="accept_timeout", head=True, if_agent=agent_id)
            except InvalidTransition:
                await self.routing.release(agent_id, conv_id, ids.now_ms())
                return
        # The agent is evidently not answering: away (no new conversations until they say
        # online again); this one went back to the queue head for whoever is free first.
        state = await self.routing.set_status(agent_id, AgentStatus.AWAY, ids.now_ms())
        self._agent_changed(state)
        await self.push_agent(agent_id)

    async def _inactivity(self, now: int) -> None:
        s = self.settings
        idle = await self.store.idle_conversations(now - int(s.inactivity_warning * 1000))
        for conv_id, last_agent in idle:
            if not self.owns("inactivity", conv_id):
                continue
            if last_agent < now - int(s.inactivity_close * 1000) and conv_id in self._warned:
                with contextlib.suppress(KefuError):
                    conv = await self.conversation(conv_id)
                    self.metrics.timer_actions.labels(kind="inactivity_close").inc()
                    await self.close_conversation(None, conv, reason="inactivity")
            elif conv_id not in self._warned:
                self._warned.add(conv_id)
                with contextlib.suppress(KefuError):
                    conv = await self.conversation(conv_id)
                    self.metrics.timer_actions.labels(kind="inactivity_warning").inc()
                    left = max(0.0, s.inactivity_close - (now - last_agent) / 1000)
                    await self._system_message(
                        conv, "inactivity_warning", {"closes_in": round(left)}
                    )

    # -- statistics ---------------------------------------------------------------------------------

    async def live_stats(self) -> dict[str, Any]:
        now = ids.now_ms()
        agents = await self.routing.agents()
        groups = []
        for group in self.groups.values():
            entries = await self.routing.queue(group.id)
            live = [e for e in entries if not e.backlog]
            groups.append(
                {
                    "group": group.id,
                    "queued": len(live),
                    "left_messages": len(entries) - len(live),
                    "longest_wait": max((now - e.since) / 1000 for e in live) if live else 0.0,
                    "agents_online": sum(
                        1
                        for a in agents
                        if group.id in a.groups and a.effective is AgentStatus.ONLINE
                    ),
                }
            )
        self.metrics.agents_online.set(sum(1 for a in agents if a.effective is AgentStatus.ONLINE))
        return {
            "ts": now,
            "groups": groups,
            "agents": [
                {
                    "agent": a.id,
                    "status": a.effective.value,
                    "load": a.load,
                    "capacity": a.capacity,
                    "groups": sorted(a.groups),
                }
                for a in agents
            ],
        }


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("desk task failed", exc_info=task.exception())
