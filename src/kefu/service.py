"""Chat operations on conversations: authorise, store, reply, push.

The service knows nothing of sockets: it receives validated requests from the gateway
with the :class:`Session` that sent them, talks to the store and the broker, and queues
replies on the session. Every operation is authorised here, by role:

* a customer reaches only conversations where they are the customer;
* an agent conversations assigned to them, and (read-only) their groups' queued ones;
* an admin every conversation, read-only unless they take it over; private notes
  (``note`` messages) are written and read by agents and admins only.

Customer-service operations (assignment, transfer, resolve, ratings...) are the desk's
(:mod:`kefu.desk`); this module hands them over after authorising the conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import msgspec

from kefu import ids
from kefu.broker import Broker
from kefu.config import Config
from kefu.desk import Desk
from kefu.errors import (
    ErrorCode,
    Forbidden,
    KefuError,
    NotFound,
    ProtocolError,
    StaleConversation,
    StoreError,
)
from kefu.metrics import Metrics
from kefu.model import (
    AgentStatus,
    Conversation,
    ConversationState,
    NewMessage,
    Principal,
    Role,
    StoredMessage,
    Visibility,
)
from kefu.protocol import frames as f
from kefu.protocol.server import encode, error_frame
from kefu.session import Session
from kefu.store.base import MessageStore
from kefu.views import agent_frame, conversation_info, message_frame

log = logging.getLogger(__name__)


#: States in which a customer's message needs no lifecycle step first.
_FAST_STATES = frozenset({ConversationState.QUEUED, ConversationState.ASSIGNED})


def can_read(principal: Principal, conv: Conversation) -> bool:
    if principal.role is Role.ADMIN:
        return True
    if principal.role is Role.CUSTOMER:
        return conv.customer_id == principal.user_id
    return conv.agent_id == principal.user_id


class ChatService:
    def __init__(
        self,
        config: Config,
        *,
        store: MessageStore,
        broker: Broker,
        metrics: Metrics,
        desk: Desk,
    ) -> None:
        self.config = config
        self.desk = desk
        self.store = store
        self.broker = broker
        self.metrics = metrics
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        #: (session, conversation) -> the last send being decided again there: the
        #: session's later sends to that conversation wait for it, so that its messages
        #: keep the order in which they were sent.
        self._retries: dict[tuple[str, str], asyncio.Task[None]] = {}

    # -- authorisation --------------------------------------------------------------------

    async def _conversation(self, principal: Principal, conv_id: str) -> Conversation:
        conv = self.store.cached_conversation(conv_id)
        if conv is None:
            conv = await self.store.get_conversation(conv_id)
        if (
            conv is not None
            and principal.role is Role.AGENT
            and not can_read(principal, conv)
            and await self.desk.can_read(principal, conv)
        ):
            return conv  # a queued conversation of the agent's group
        return self._authorized(principal, conv, conv_id)

    @staticmethod
    def _authorized(principal: Principal, conv: Conversation | None, conv_id: str) -> Conversation:
        if conv is None:
            raise NotFound(f"conversation {conv_id!r} does not exist")
        if not can_read(principal, conv):
            raise Forbidden(f"conversation {conv_id!r} is not yours")
        return conv

    # -- dispatch -------------------------------------------------------------------------

    async def handle(self, session: Session, request: f.ClientRequest) -> None:
        """Serve one authenticated request; errors become error frames on the session."""
        try:
            if isinstance(request, f.Send):
                await self.send(session, request)
            elif isinstance(request, f.Sync):
                await self.sync(session, request)
            elif isinstance(request, f.History):
                await self.history(session, request)
            elif isinstance(request, f.Read):
                with self._counted():  # a write: a drain waits for its reply
                    await self.read(session, request)
            elif isinstance(request, f.Typing):
                await self.typing(session, request)
            elif isinstance(request, f.Ping):
                session.send(f.Pong(ts=ids.now_ms(), id=request.id))
            elif isinstance(request, f.Open):
                with self._counted():
                    await self.open(session, request)
            elif isinstance(request, f.ListConversations):
                await self.list_conversations(session, request)
            else:
                with self._counted():
                    await self.desk_request(session, request)
        except KefuError as exc:
            self.reply_error(
                session, exc.code, exc.message, request.id, retry_after=exc.retry_after
            )
        except Exception:  # a bug must cost one request, not the connection
            log.exception("request %s failed", type(request).__name__)
            self.reply_error(session, ErrorCode.INTERNAL, "internal error", request.id)

    async def desk_request(self, session: Session, request: f.ClientRequest) -> None:
        """The customer-service operations: authorise, then hand to the desk."""
        principal = session.principal
        assert principal is not None
        desk = self.desk
        if isinstance(request, f.SetStatus):
            state = await desk.set_status(principal, AgentStatus(request.status))
            session.send(agent_frame(state, request.id))
            return
        if isinstance(request, f.Pick):
            conv = await desk.pick(principal, request.conv)
        elif isinstance(request, f.Rate):
            conv = await desk.rate(principal, request.conv, request.score, request.comment)
        elif isinstance(request, f.ListQueue):
            entries = await desk.queue_of(principal, request.group)
            live = 0
            items = []
            for e in entries:
                live += not e.backlog
                items.append(
                    f.QueueItem(
                        conv=e.conv,
                        customer=e.customer,
                        position=0 if e.backlog else live,
                        since=e.since,
                        backlog=e.backlog,
                    )
                )
            session.send(f.Queue(group=request.group, entries=items, id=request.id))
            return
        elif isinstance(request, f.ListCanned):
            responses = await desk.canned(principal, request.group)
            session.send(
                f.Canned(
                    id=request.id,
                    responses=[
                        f.CannedItem(id=c.id, shortcut=c.shortcut, text=c.text, group=c.group_id)
                        for c in responses
                    ],
                )
            )
            return
        else:
            conv = await self._conversation(principal, request.conv)  # type: ignore[union-attr]
            if isinstance(request, f.Accept):
                conv = await desk.accept(principal, conv)
            elif isinstance(request, f.Transfer):
                conv = await desk.transfer(
                    principal,
                    conv,
                    agent_id=request.agent,
                    group_id=request.group,
                    note=request.note,
                )
            elif isinstance(request, f.Wait):
                conv = await desk.wait(principal, conv)
            elif isinstance(request, f.Resolve):
                conv = await desk.resolve(principal, conv)
            elif isinstance(request, f.Close):
                conv = await desk.close_conversation(principal, conv, reason=principal.role.value)
            elif isinstance(request, f.SetLabels):
                conv = await desk.set_labels(principal, conv, request.labels)
            elif isinstance(request, f.Watch):
                await desk.watch(principal, conv, request.on)
            elif isinstance(request, f.Takeover):
                conv = await desk.takeover(principal, conv)
            else:  # pragma: no cover - the protocol only yields the ops above
                raise ProtocolError(f"unexpected request {type(request).__name__}")
        last = await self.store.last_seq(conv.id)
        conv = self._latest(conv)
        session.send(f.Conversation(id=request.id, conversation=conversation_info(conv, last)))

    def _latest(self, conv: Conversation) -> Conversation:
        """The newest state of ``conv`` known here. A reply is sent after awaits, during which
        the desk may have moved the conversation on (an assignment right after ``open``) and
        pushed that: the reply must not show the client an older state after the push."""
        cached = self.store.cached_conversation(conv.id)
        if cached is not None and cached.updated_at >= conv.updated_at:
            return cached
        return conv

    def reply_error(
        self,
        session: Session,
        code: ErrorCode,
        message: str,
        request_id: f.RequestId | None,
        *,
        retry_after: float | None = None,
    ) -> None:
        self.metrics.error_code(code.value).inc()
        session.send(error_frame(code, message, request_id=request_id, retry_after=retry_after))

    # -- send -----------------------------------------------------------------------------

    async def send(self, session: Session, request: f.Send) -> None:
        received = time.perf_counter()
        principal = session.principal
        assert principal is not None
        self._refuse_if_draining(request.type)
        # Counted from here, so that a drain waits for a send whose lookup is in progress.
        self._begin()
        try:
            if self._retries:  # a send of this session here is being decided again: after it
                earlier = self._retries.get((session.id, request.conv))
                if earlier is not None:
                    await asyncio.wait({earlier})
            found = self.store.conversation_hint(request.conv)
            if found is None:
                found = await self.store.get_conversation(request.conv)
            await self._send_counted(session, request, principal, received, found, retry=True)
        except BaseException:
            self._end()
            raise

    def _retried(self, key: tuple[str, str], task: asyncio.Task[None]) -> None:
        if self._retries.get(key) is task:
            del self._retries[key]

    async def _resend_fresh(
        self,
        session: Session,
        request: f.Send,
        received: float,
        after: asyncio.Task[None] | None,
    ) -> None:
        """The append found the conversation changed since it was authorised (by another
        node): decide again on a fresh read, once, after the session's earlier retry in
        that conversation (``after``). Counted already (see :meth:`send`)."""
        principal = session.principal
        assert principal is not None
        try:
            if after is not None:
                await asyncio.wait({after})
            found = await self.store.get_conversation(request.conv, fresh=True)
            await self._send_counted(session, request, principal, received, found, retry=False)
        except KefuError as exc:
            self._end()
            self.reply_error(
                session, exc.code, exc.message, request.id, retry_after=exc.retry_after
            )
        except Exception:  # a bug must cost one request, not the connection
            self._end()
            log.exception("a send decided again failed")
            self.reply_error(session, ErrorCode.INTERNAL, "internal error", request.id)
        except BaseException:
            self._end()
            raise

    async def _send_counted(
        self,
        session: Session,
        request: f.Send,
        principal: Principal,
        received: float,
        found: Conversation | None,
        *,
        retry: bool,
    ) -> None:
        """Take the desk's step the conversation's state calls for, if any, then authorise
        and submit; ``retry``: a stale authorisation is decided again once."""
        if principal.role is Role.CUSTOMER and request.type in f.INTERNAL_MESSAGE_TYPES:
            self.metrics.message_result(request.type, "rejected").inc()
            raise Forbidden("private notes are for agents and admins")  # before any step
        if (
            found is not None
            and found.state not in _FAST_STATES
            and principal.role is Role.CUSTOMER
            and found.customer_id == principal.user_id
        ):
            found = await self.desk.before_customer_message(principal, found)
        elif (
            found is not None
            and principal.role is Role.AGENT
            and request.type == "note"
            and found.agent_id != principal.user_id
        ):
            # A note on a queued conversation of one of the agent's groups: the group
            # decides, which the append's guard does not check, so read it afresh.
            found = await self.store.get_conversation(request.conv, fresh=True)
            if (
                found is not None
                and found.agent_id != principal.user_id
                and await self.desk.can_read(principal, found)
            ):
                self._refuse_if_draining(request.type)
                self._note_queued(session, request, principal, received, found, retry=retry)
                return
        self._submit(session, request, principal, received, found, retry=retry)

    def _refuse_if_draining(self, message_type: str) -> None:
        if self.draining:
            self.metrics.message_result(message_type, "rejected").inc()
            raise KefuError(
                "node is shutting down: reconnect and resend", code=ErrorCode.SHUTTING_DOWN
            )

    def _submit(
        self,
        session: Session,
        request: f.Send,
        principal: Principal,
        received: float,
        found: Conversation | None,
        *,
        retry: bool,
    ) -> None:
        """Authorise and hand the message to the store; the ack follows the commit."""
        self._refuse_if_draining(request.type)  # the lookup may have awaited
        try:
            conv = self._authorized(principal, found, request.conv)
        except KefuError:
            self.metrics.message_result(request.type, "rejected").inc()
            raise
        internal = request.type in f.INTERNAL_MESSAGE_TYPES
        try:
            self._may_write(principal, conv, internal=internal)
        except KefuError:
            self.metrics.message_result(request.type, "rejected").inc()
            raise
        message = NewMessage(
            conv=conv.id,
            sender=principal.user_id,
            sender_role=principal.role,
            client_msg_id=request.client_msg_id,
            type=request.type,
            body=bytes(request.body),
            visibility=Visibility.INTERNAL if internal else Visibility.ALL,
            expect=(conv.state, conv.agent_id),
        )
        try:
            future = self.store.submit(message)
        except StoreError:
            self.metrics.message_result(request.type, "failed").inc()
            raise
        future.add_done_callback(
            lambda fut: self._stored(fut, session, request, conv, received, retry=retry)
        )

    @staticmethod
    def _may_write(principal: Principal, conv: Conversation, *, internal: bool) -> None:
        """Who may post what, in which state (the conversation is readable already)."""
        if internal:
            if principal.role is Role.CUSTOMER:
                raise Forbidden("private notes are for agents and admins")
            if conv.state is ConversationState.CLOSED:
                raise KefuError(
                    f"conversation {conv.id!r} is closed", code=ErrorCode.CONVERSATION_CLOSED
                )
            return
        if conv.state is ConversationState.CLOSED:
            raise KefuError(
                f"conversation {conv.id!r} is closed", code=ErrorCode.CONVERSATION_CLOSED
            )
        if principal.role is Role.CUSTOMER:
            return
        if conv.agent_id != principal.user_id:
            if principal.role is Role.ADMIN:
                raise Forbidden("supervisors watch read-only: take the conversation over to write")
            raise Forbidden(f"conversation {conv.id!r} is not assigned to you")
        if conv.state is ConversationState.RESOLVED:
            raise KefuError(
                f"conversation {conv.id!r} is resolved: the customer's next message reopens it",
                code=ErrorCode.INVALID_TRANSITION,
            )

    def _note_queued(
        self,
        session: Session,
        request: f.Send,
        principal: Principal,
        received: float,
        conv: Conversation,
        *,
        retry: bool,
    ) -> None:
        """A note by an agent of the group on a queued conversation they may read."""
        future = self.store.submit(
            NewMessage(
                conv=conv.id,
                sender=principal.user_id,
                sender_role=principal.role,
                client_msg_id=request.client_msg_id,
                type=request.type,
                body=bytes(request.body),
                visibility=Visibility.INTERNAL,
                expect=(conv.state, conv.agent_id),
            )
        )
        future.add_done_callback(
            lambda fut: self._stored(fut, session, request, conv, received, retry=retry)
        )

    def _stored(
        self,
        future: asyncio.Future[StoredMessage],
        session: Session,
        request: f.Send,
        conv: Conversation,
        received: float,
        *,
        retry: bool = False,
    ) -> None:
        try:
            exc = future.exception()
            if isinstance(exc, StaleConversation) and retry:
                self.store.forget_hint(conv.id)
                self.metrics.stale_sends.inc()
                self._begin()  # the retry's own count; this one ends below
                key = (session.id, request.conv)
                try:
                    task = asyncio.get_running_loop().create_task(
                        self._resend_fresh(session, request, received, self._retries.get(key))
                    )
                except RuntimeError:  # the loop is closing: no retry, no count left behind
                    self._end()
                    raise
                self._retries[key] = task
                task.add_done_callback(lambda done: self._retried(key, done))
                return
            if exc is not None:
                self.metrics.message_result(request.type, "failed").inc()
                code = exc.code if isinstance(exc, KefuError) else ErrorCode.STORE_UNAVAILABLE
                if not isinstance(exc, KefuError):
                    log.error("append failed unexpectedly", exc_info=exc)
                self.reply_error(
                    session,
                    code,
                    f"not acknowledged ({exc}): resend with the same client_msg_id",
                    request.id,
                )
                return
            stored = future.result()
            if stored.duplicate and (stored.type, stored.body) != (
                request.type,
                bytes(request.body),
            ):
                self.metrics.message_result(request.type, "rejected").inc()
                self.reply_error(
                    session,
                    ErrorCode.IDEMPOTENCY_CONFLICT,
                    f"client_msg_id {request.client_msg_id!r} was used for another message "
                    f"(seq {stored.seq})",
                    request.id,
                )
                return
            session.send(
                f.Ack(
                    id=request.id,
                    conv=stored.conv,
                    client_msg_id=request.client_msg_id,
                    msg_id=stored.msg_id,
                    seq=stored.seq,
                    ts=stored.ts,
                    duplicate=stored.duplicate,
                )
            )
            self.metrics.ack_latency.observe(time.perf_counter() - received)
            # A duplicate is pushed again: its first push may never have happened (the
            # writer can die between commit and reply). Clients dedupe by (conv, seq).
            result = "duplicate" if stored.duplicate else "stored"
            self.metrics.message_result(request.type, result).inc()
            self.metrics.push_kind("message").inc()
            # Recipients as of now, not of the submit: an assignment or transfer may have
            # committed in between, and the new agent must get this push.
            latest = self._latest(conv)
            self.desk.push_message(latest, stored, received=received, exclude=session)
            assert session.principal is not None
            self.desk.message_stored(session.principal, latest, stored)
        finally:
            self._end()

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        self._begin()
        try:
            yield
        finally:
            self._end()

    def _begin(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def _end(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until every submitted message has been acked or failed."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- reads ----------------------------------------------------------------------------

    async def sync(self, session: Session, request: f.Sync) -> None:
        assert session.principal is not None
        await self._conversation(session.principal, request.conv)
        limit = min(request.limit, self.config.limits.max_page)
        rows = await self.store.messages_after(request.conv, request.after_seq, limit + 1)
        page = self._page(request.conv, rows, limit, request.id, newest_last=True)
        session.send(self._visible(session.principal, page))

    async def history(self, session: Session, request: f.History) -> None:
        assert session.principal is not None
        await self._conversation(session.principal, request.conv)
        limit = min(request.limit, self.config.limits.max_page)
        before = request.before_seq
        while True:
            rows = await self.store.messages_before(request.conv, before, limit + 1)
            page = self._page(request.conv, rows, limit, request.id, newest_last=False)
            oldest = page.messages[0].seq if page.messages else None
            page = self._visible(session.principal, page)
            # A customer's page of private notes only would be empty with has_more, leaving
            # nothing to page back from (the next before_seq is the first message's seq):
            # go on to older messages instead.
            if page.messages or not page.has_more or oldest is None:
                break
            before = oldest
        session.send(page)

    @staticmethod
    def _visible(principal: Principal, page: f.Messages) -> f.Messages:
        """Customers never see internal messages; ``last_seq`` still covers them, so a
        client that syncs past a private note's seq knows nothing is missing there."""
        if principal.role is not Role.CUSTOMER:
            return page
        page.messages = [m for m in page.messages if m.type not in f.INTERNAL_MESSAGE_TYPES]
        return page

    def _page(
        self,
        conv: str,
        rows: list[StoredMessage],
        limit: int,
        request_id: Any,
        *,
        newest_last: bool,
    ) -> f.Messages:
        has_more = len(rows) > limit
        if has_more:
            # sync pages forward (drop the newest extra), history pages back (drop the oldest)
            rows = rows[:limit] if newest_last else rows[1:]
        # A page is one frame: keep it well inside the connection's send queue.
        budget = self.config.limits.send_queue_bytes // 2
        size = 0
        ordered = rows if newest_last else rows[::-1]
        for count, row in enumerate(ordered):
            size += len(row.body) + 256
            if size > budget and count > 0:
                kept = ordered[:count]
                rows = kept if newest_last else kept[::-1]
                has_more = True
                break
        return f.Messages(
            id=request_id,
            conv=conv,
            messages=[message_frame(m) for m in rows],
            has_more=has_more,
            last_seq=rows[-1].seq if rows else 0,
        )

    async def list_conversations(self, session: Session, request: f.ListConversations) -> None:
        assert session.principal is not None
        items = await self.store.list_conversations(
            session.principal.user_id, limit=self.config.limits.max_page
        )
        session.send(
            f.Conversations(
                id=request.id,
                conversations=[
                    conversation_info(s.conversation, s.last_seq, s.read_seq) for s in items
                ],
            )
        )

    # -- receipts and typing --------------------------------------------------------------

    async def read(self, session: Session, request: f.Read) -> None:
        principal = session.principal
        assert principal is not None
        conv = await self._conversation(principal, request.conv)
        if principal.user_id not in conv.participants():
            # An admin looking in marks nothing and tells no one.
            session.send(f.Ok(id=request.id))
            return
        last = await self.store.last_seq(conv.id)
        mark = await self.store.mark_read(conv.id, principal.user_id, min(request.seq, last))
        session.send(f.Ok(id=request.id))
        self.metrics.push_kind("read").inc()
        self.broker.deliver(
            conv.participants(),
            encode(f.ReadReceipt(conv=conv.id, user=principal.user_id, seq=mark)),
            exclude=session,
        )

    async def typing(self, session: Session, request: f.Typing) -> None:
        principal = session.principal
        assert principal is not None
        conv = await self._conversation(principal, request.conv)
        if principal.user_id not in (conv.customer_id, conv.agent_id):
            return  # watching or previewing is silent: only the two sides type
        others = [u for u in self.desk.recipients(conv, internal=False) if u != principal.user_id]
        self.metrics.push_kind("typing").inc()
        self.broker.deliver(
            others, encode(f.TypingNotice(conv=conv.id, user=principal.user_id)), ephemeral=True
        )

    # -- conversations --------------------------------------------------------------------

    async def open(self, session: Session, request: f.Open) -> None:
        principal = session.principal
        assert principal is not None
        if self.draining:
            raise KefuError("node is shutting down", code=ErrorCode.SHUTTING_DOWN)
        if request.context is not None and request.context_type is None:
            raise ProtocolError("context needs context_type (order_card or listing_card)")
        context = None if request.context is None else msgspec.json.encode(request.context)
        context_type = request.context_type if context is not None else None
        if principal.role is Role.CUSTOMER:
            if request.customer_id not in (None, principal.user_id):
                raise Forbidden("customers open conversations for themselves only")
            conv, created = await self.desk.open_for_customer(
                principal, request.group, context_type, context
            )
        elif request.customer_id is None:
            raise ProtocolError("agents and admins must name customer_id")
        elif principal.role is Role.ADMIN:  # on the customer's behalf: routed like theirs
            customer = Principal(request.customer_id, Role.CUSTOMER)
            conv, created = await self.desk.open_for_customer(
                customer, request.group, context_type, context
            )
        else:
            conv = await self.desk.open_by_agent(
                principal, request.customer_id, request.group, context_type, context
            )
            created = False
        last = await self.store.last_seq(conv.id)
        conv = self._latest(conv)
        info = conversation_info(conv, last)
        session.send(f.Conversation(id=request.id, conversation=info))
        self.broker.deliver(
            self.desk.recipients(conv, internal=False),
            encode(f.Conversation(conversation=info)),
            exclude=session,
        )
        if created:
            await self.desk.route_opened(conv)  # after the reply, so that its events follow it
