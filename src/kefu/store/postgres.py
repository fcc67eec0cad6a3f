"""The cluster's system of record: PostgreSQL through asyncpg, with group commit.

Every node writes through one batching task: the writes queued while a transaction runs
form the next one, so a busy node commits hundreds of messages per fsync, and an ack goes
out only after its transaction committed. A conversation's next seq comes from its row
(``conversations.last_seq``), incremented in the transaction that stores the messages and
under that row's lock: nodes writing to one conversation queue behind each other, seqs
never repeat or skip, and nothing outside PostgreSQL (a restarted or flushed Redis) can
make them rewind. The primary key ``(conversation_id, seq)`` and the idempotency index
``(conversation_id, sender_id, client_msg_id)`` guard both promises in the database.

A busy writer (its last batch held more than one write) that finds fewer than ``GATHER``
writes queued waits ``commit_delay`` (``pg_commit_delay``, 2 ms) before it takes them:
every commit costs PostgreSQL a few hundred µs of CPU whatever its size, and on a loaded
machine the CPU so saved shortens every other wait. An idle node commits a lone write at
once.

A batch of appends does not wait for conversations another node's transaction holds (the
agent and the customer of a conversation are often on two nodes, and two batches that each
span many conversations would otherwise commit one after the other): their writes come
back ``locked`` and go first into the next batch, in order, and a write that found its
conversation locked ``LOCKED_TRIES`` times goes into a batch that waits for the lock.

One node keeps the order of its own submissions (the call fixes the order, as the
interface says) because a single task runs its transactions one after another. A batch
that loses a race with another node (a deadlock, or a resend committed there first) is run
again from the start; a batch whose connection breaks fails as "outcome unknown", and the
client's resend under the same ``client_msg_id`` is stored at most once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
import asyncpg.pool
import msgspec

from kefu import ids
from kefu.errors import (
    NotFound,
    Overloaded,
    StoreClosed,
    StoreError,
)
from kefu.metrics import Metrics
from kefu.model import (
    Agent,
    CannedResponse,
    Conversation,
    ConversationState,
    ConversationSummary,
    Group,
    NewMessage,
    RoutingMode,
    StoredMessage,
)
from kefu.store import jobs
from kefu.store import sqlite_writer as w
from kefu.store.base import ConversationFilter, MessageStore
from kefu.store.pg_schema import MigrationFailed, migrate_url
from kefu.store.sqlite_schema import (
    CONV_COLUMNS,
    CONV_FIELDS,
    MESSAGE_COLUMNS,
    conversation_from_row,
    message_from_row,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MAX_PENDING = 5000
OVERLOAD_RETRY_AFTER = 0.5
#: Times a batch that lost a race with another node (deadlock, duplicate) is run again.
RACE_RETRIES = 5
#: A write queued this long without an answer makes the store unready.
STALL_SECONDS = 10.0
#: With this many writes queued a busy writer commits at once, without the commit delay.
GATHER = 64
#: Batches a write may find its conversation locked by another node's transaction before
#: it goes in a batch that waits for the lock.
LOCKED_TRIES = 3

#: Errors that mean "PostgreSQL is unreachable or the connection broke": the outcome of a
#: transaction in flight is unknown, and the write is retryable.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    # "cannot switch to state ...": a connection the server dropped mid-operation.
    asyncpg.InternalClientError,
)
#: Errors that mean "another transaction won a race": run the batch again.
RACE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.UniqueViolationError,
)
#: Every error a statement may raise that means "the store failed", not "a bug".
STATEMENT_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)
UNKNOWN_OUTCOME = (
    "the database connection failed: outcome unknown, resend with the same client_msg_id"
)

_CONV_SELECT = f"SELECT {CONV_COLUMNS} FROM conversations"
#: Lower-cased (Unicode-aware, whatever the database's locale) searchable text of a body.
_SEARCH_TEXT = (
    "lower((COALESCE(b.j ->> 'text', '') || ' ' || COALESCE(b.j ->> 'title', '') || ' ' || "
    "COALESCE(b.j ->> 'id', '')) COLLATE \"und-x-icu\")"
)

_APPEND = (
    "SELECT * FROM kefu_append($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], "
    "$6::bytea[], $7::text[], $8::text[], $9::text[], $10::text[], $11::bigint, $12::boolean)"
)
#: The result of a job whose conversation another writer's transaction held (schema 3's
#: ``j_skip_locked``): nothing stored, no seq used; the writer runs it again.
LOCKED = w.Failed(code="locked", message="the conversation is locked by another writer")


def _append_result(job: w.Append, msg_id: str, ts: int, row: asyncpg.Record) -> w.Stored | w.Failed:
    """One row of ``kefu_append`` as the job's result (``msg_id`` and ``ts``: what the job
    was sent with, a stored message's own)."""
    outcome = row["outcome"]
    if outcome == "stored":
        return job.stored(row["seq"], msg_id, ts)
    if outcome == "duplicate":  # the message stored earlier, on this node or another
        return w.Stored(
            conv=job.conv,
            seq=row["seq"],
            msg_id=row["msg_id"],
            sender=job.sender,
            sender_role=row["sender_role"],
            client_msg_id=job.client_msg_id,
            type=row["type"],
            body=bytes(row["body"]),
            ts=row["ts"],
            duplicate=True,
            visibility=row["visibility"],
        )
    if outcome == "locked":
        return LOCKED
    if outcome == "stale":
        return w.Failed(
            code="stale",
            message=f"conversation {job.conv!r} is now {row['cur_state']} "
            f"(agent {row['cur_agent']})",
        )
    return w.Failed(code="not_found", message=f"conversation {job.conv!r} does not exist")


#: A pooled connection (what every statement here runs on).
if TYPE_CHECKING:
    Conn = asyncpg.pool.PoolConnectionProxy[asyncpg.Record]
else:
    Conn = asyncpg.pool.PoolConnectionProxy


async def _keep_session(conn: Any) -> None:
    """The pool's reset hook: nothing to reset (see :meth:`PostgresStore.start`)."""


class _Sql:
    """Numbered placeholders for a statement built piece by piece."""

    def __init__(self) -> None:
        self.params: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.params.append(value)
        return f"${len(self.params)}"


@dataclasses.dataclass(slots=True)
class _Queued:
    job: w.Job
    future: asyncio.Future[w.Result]
    queued_at: float
    #: Batches that found its conversation locked by another writer.
    locked: int = 0


@dataclasses.dataclass(eq=False)
class _Lane:
    """One writer: its queue, the batch it is committing, its task. A conversation's jobs
    always go to the same lane, so they commit in the order they were submitted."""

    number: int
    queue: list[_Queued] = dataclasses.field(default_factory=list)
    inflight: list[_Queued] = dataclasses.field(default_factory=list)
    #: The last batch held more than one write (the commit delay applies).
    busy: bool = False
    #: The pool connection this writer keeps between batches (taken again when broken).
    conn: Conn | None = None
    wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def oldest(self) -> float | None:
        first = self.inflight[0] if self.inflight else self.queue[0] if self.queue else None
        return None if first is None else first.queued_at


def _conversation_of(job: w.Job) -> str:
    """The conversation a write job belongs to (its lane's key)."""
    if isinstance(job, w.Create):
        return job.id
    conv: str = getattr(job, "conv", "")
    return conv


#: Conversations a node keeps as hints for authorising sends.
HINT_CACHE_SIZE = 100_000


class PostgresStore(MessageStore):
    """PostgreSQL implementation of :class:`MessageStore` (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        metrics: Metrics,
        max_batch: int = 1000,
        max_pending: int = DEFAULT_MAX_PENDING,
        pool_min: int = 2,
        pool_max: int = 10,
        command_timeout: float = 5.0,
        writers: int = 1,
        commit_delay: float = 0.002,
    ) -> None:
        self.url = url
        self.commit_delay = commit_delay
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.pool_min = pool_min
        self.pool_max = pool_max
        self.command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None
        #: Writers committing concurrently (each its own batches and connection), so that
        #: a batch waits for the one before it in its lane only, not for every commit.
        self._lanes = [_Lane(n) for n in range(max(1, writers))]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = True
        #: Conversations as last read or written here (see :meth:`conversation_hint`).
        self._hints: OrderedDict[str, Conversation] = OrderedDict()

    # -- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await migrate_url(self.url, timeout=self.command_timeout)
        except MigrationFailed as exc:
            raise StoreError(f"cannot open the database: {exc}") from exc
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=self.pool_min,
                max_size=self.pool_max,
                command_timeout=self.command_timeout,
                timeout=self.command_timeout,
                # Kefu keeps no session state on pooled connections (no LISTEN, cursors,
                # session locks or SETs): skip asyncpg's four-statement reset per release.
                reset=_keep_session,
                # The batch statements are prepared once; a generic plan made while the
                # tables were nearly empty would scan them forever after.
                server_settings={"plan_cache_mode": "force_custom_plan"},
            )
        except STATEMENT_ERRORS as exc:
            raise StoreError(f"cannot open the database: {exc}") from exc
        self._closed = False
        for lane in self._lanes:
            lane.task = self._loop.create_task(
                self._write_loop(lane), name=f"kefu-pg-writer-{lane.number}"
            )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for lane in self._lanes:
            lane.wake.set()
        for lane in self._lanes:
            if lane.task is not None:
                await lane.task  # finishes what was queued (it stops once the queue is empty)
            await self._drop_writer_connection(lane, broken=False)
        if self._pool is not None:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await asyncio.wait_for(self._pool.close(), self.command_timeout)

    async def ping(self) -> None:
        if self._closed or any(lane.task is None or lane.task.done() for lane in self._lanes):
            raise StoreError("the store writer is not running")
        waiting = [t for t in (lane.oldest() for lane in self._lanes) if t is not None]
        if waiting and time.monotonic() - min(waiting) > STALL_SECONDS:
            raise StoreError(f"a write has waited over {STALL_SECONDS:.0f}s for the database")
        await self._read("ping", lambda conn: conn.fetchval("SELECT 1"))

    @property
    def pending(self) -> int:
        return sum(len(lane.queue) + len(lane.inflight) for lane in self._lanes)

    # -- the writer -----------------------------------------------------------------------

    def _enqueue(self, job: w.Job) -> asyncio.Future[w.Result]:
        if self._closed or self._loop is None:
            raise StoreClosed("the message store is closed")
        if self.pending >= self.max_pending:
            self.metrics.store_overloaded.inc()
            raise Overloaded(
                f"the store has {self.pending} writes queued: retry shortly",
                retry_after=OVERLOAD_RETRY_AFTER,
            )
        future: asyncio.Future[w.Result] = self._loop.create_future()
        lanes = self._lanes
        lane = lanes[hash(_conversation_of(job)) % len(lanes)] if len(lanes) > 1 else lanes[0]
        lane.queue.append(_Queued(job, future, time.monotonic()))
        lane.wake.set()
        return future

    async def _write_loop(self, lane: _Lane) -> None:
        while True:
            if not lane.queue:
                if self._closed:
                    return
                lane.wake.clear()
                await lane.wake.wait()
                continue
            if lane.busy and self.commit_delay > 0 and len(lane.queue) < GATHER:
                await asyncio.sleep(self.commit_delay)  # more writes share the commit
            batch = lane.queue[: self.max_batch]
            del lane.queue[: self.max_batch]
            lane.inflight = batch
            lane.busy = len(batch) > 1
            # Skip conversations other nodes hold, unless a write has waited long enough.
            skip_locked = all(q.locked < LOCKED_TRIES for q in batch)
            started = time.perf_counter()
            try:
                results = await self._run_batch(lane, [q.job for q in batch], skip_locked)
            except Exception as exc:  # pragma: no cover - a bug must not stop the writer
                log.exception("write batch failed")
                results = [w.Failed(code="store_unavailable", message=str(exc))] * len(batch)
            finally:
                lane.inflight = []
            self.metrics.store_batch_size.observe(len(batch))
            self.metrics.store_commit_seconds.observe(time.perf_counter() - started)
            again: list[_Queued] = []
            for queued, result in zip(batch, results, strict=True):
                if result is LOCKED:
                    queued.locked += 1
                    again.append(queued)
                    continue
                if isinstance(result, w.Failed):
                    self.metrics.store_errors.labels(operation="write").inc()
                if not queued.future.done():
                    queued.future.set_result(result)
            if again:  # first in the queue again, in their order: a conversation keeps its own
                self.metrics.store_requeued.inc(len(again))
                lane.queue[:0] = again
                if len(again) == len(batch) and self.commit_delay > 0:
                    await asyncio.sleep(self.commit_delay)  # no progress: let the holder commit

    async def _writer_connection(self, lane: _Lane) -> Conn:
        """The lane's connection, kept from batch to batch (a pool acquire and release per
        batch cost as much node CPU as the batch's own statement)."""
        conn = lane.conn
        if conn is None or conn.is_closed():
            assert self._pool is not None
            conn = lane.conn = await self._pool.acquire(timeout=self.command_timeout)
        return conn

    async def _drop_writer_connection(self, lane: _Lane, *, broken: bool) -> None:
        conn, lane.conn = lane.conn, None
        if conn is None or self._pool is None:
            return
        if broken:
            conn.terminate()  # the pool opens a new one when it is next needed
        with contextlib.suppress(*CONNECTION_ERRORS):
            await self._pool.release(conn, timeout=self.command_timeout)

    async def _run_batch(
        self, lane: _Lane, jobs: list[w.Job], skip_locked: bool = False
    ) -> list[w.Result]:
        """The batch's results in order; with ``skip_locked`` an append whose conversation
        another transaction holds gets :data:`LOCKED` (a batch mixing appends with other
        writes waits for its locks)."""
        for attempt in range(RACE_RETRIES + 1):
            try:
                conn = await self._writer_connection(lane)
                appends = [job for job in jobs if isinstance(job, w.Append)]
                if len(appends) == len(jobs):
                    # One statement: its own transaction, one round trip.
                    return list(await self._append_many(conn, appends, skip_locked))
                async with conn.transaction():
                    return await self._apply(conn, jobs)
            except RACE_ERRORS as exc:
                if attempt == RACE_RETRIES:
                    log.warning("batch of %d lost %d races: %s", len(jobs), attempt + 1, exc)
                    break
                await asyncio.sleep(0.001 * (attempt + 1))
            except CONNECTION_ERRORS as exc:
                log.error("batch of %d failed: %s", len(jobs), exc)
                await self._drop_writer_connection(lane, broken=True)
                return [w.Failed(code="store_unavailable", message=UNKNOWN_OUTCOME)] * len(jobs)
            except asyncpg.PostgresError as exc:
                if len(jobs) > 1:  # one bad job must fail alone
                    log.warning("batch of %d failed (%s): retrying one by one", len(jobs), exc)
                    return [(await self._run_batch(lane, [job], skip_locked))[0] for job in jobs]
                return [w.Failed(code="store_unavailable", message=f"store error: {exc}")]
        return [w.Failed(code="store_unavailable", message="write conflict: retry")] * len(jobs)

    async def _apply(self, conn: Conn, jobs: list[w.Job]) -> list[w.Result]:
        results: list[w.Result | None] = [None] * len(jobs)
        appends: list[int] = []

        async def flush() -> None:
            stored = await self._append_many(conn, [jobs[i] for i in appends])  # type: ignore[misc]
            for i, result in zip(appends, stored, strict=True):
                results[i] = result
            appends.clear()

        for i, job in enumerate(jobs):
            if isinstance(job, w.Append):
                appends.append(i)
                continue
            if appends:  # keep seq order: appends before this job go first
                await flush()
            if isinstance(job, w.Create):
                results[i] = await self._create(conn, job)
            elif isinstance(job, w.MarkRead):
                value = await conn.fetchval(
                    "UPDATE participants SET read_seq = GREATEST(read_seq, $1) "
                    "WHERE conversation_id = $2 AND user_id = $3 RETURNING read_seq",
                    job.seq,
                    job.conv,
                    job.user,
                )
                results[i] = w.Done(value=int(value or 0))
            elif isinstance(job, w.Transition):
                results[i] = await self._transition(conn, job)
            elif isinstance(job, w.Successor):
                results[i] = await self._successor(conn, job)
            else:  # pragma: no cover - Exec jobs carry SQLite statements
                raise TypeError(f"the PostgreSQL store does not run {type(job).__name__} jobs")
        if appends:
            await flush()
        return results  # type: ignore[return-value]

    async def _append_many(
        self, conn: Conn, jobs: list[w.Append], skip_locked: bool = False
    ) -> list[w.Stored | w.Failed]:
        """Store a batch of appends with one call of ``kefu_append`` (migration 0002: one
        round trip; see the function for the rules). A key repeated within the batch is
        sent once; its repeats take its result as duplicates."""
        first: dict[tuple[str, str, str], int] = {}
        repeats: dict[int, int] = {}
        sent: list[w.Append] = []
        for i, job in enumerate(jobs):
            if job.client_msg_id is not None:
                key = (job.conv, job.sender, job.client_msg_id)
                if key in first:
                    repeats[i] = first[key]
                    continue
                first[key] = len(sent)
            sent.append(job)
        msg_ids, ts = [ids.new_id() for _ in sent], ids.now_ms()
        rows = await conn.fetch(
            _APPEND,
            [j.conv for j in sent],
            [j.sender for j in sent],
            [j.sender_role for j in sent],
            [j.client_msg_id for j in sent],
            [j.type for j in sent],
            [j.body for j in sent],
            [j.visibility for j in sent],
            [j.expect_state for j in sent],
            [j.expect_agent for j in sent],
            msg_ids,
            ts,
            skip_locked,
        )
        results = iter(
            [
                _append_result(job, msg_id, ts, row)
                for job, msg_id, row in zip(sent, msg_ids, rows, strict=True)
            ]
        )
        out: list[w.Stored | w.Failed] = []
        by_sent: list[w.Stored | w.Failed] = []
        for i in range(len(jobs)):
            if i in repeats:
                earlier = by_sent[repeats[i]]
                if isinstance(earlier, w.Stored):
                    earlier = msgspec.structs.replace(earlier, duplicate=True)
                out.append(earlier)
            else:
                result = next(results)
                by_sent.append(result)
                out.append(result)
        return out

    async def _create(self, conn: Conn, job: w.Create) -> w.Done:
        assigned = job.created_at if job.agent_id else None
        await conn.execute(
            # ON CONFLICT: a batch run again after a lost race may have stored it already.
            "INSERT INTO conversations (id, customer_id, agent_id, group_id, state, "
            "context_type, context, created_at, updated_at, assigned_at, first_assigned_at, "
            "accepted_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9, $9, $9) "
            "ON CONFLICT (id) DO NOTHING",
            job.id,
            job.customer_id,
            job.agent_id,
            job.group_id,
            job.state,
            job.context_type,
            job.context,
            job.created_at,
            assigned,
        )
        users, roles = [job.customer_id], ["customer"]
        if job.agent_id is not None and job.agent_id != job.customer_id:
            users.append(job.agent_id)
            roles.append("agent")
        await conn.execute(
            "INSERT INTO participants (conversation_id, user_id, role) "
            "SELECT $1, u, r FROM unnest($2::text[], $3::text[]) AS p(u, r) "
            "ON CONFLICT DO NOTHING",
            job.id,
            users,
            roles,
        )
        return w.Done()

    async def _event(self, conn: Conn, conv: str, seq: int, job: w.Transition) -> w.Stored:
        event = w.Stored(
            conv=conv,
            seq=seq,
            msg_id=ids.new_id(),
            sender=job.sender,
            sender_role=job.sender_role,
            client_msg_id=None,
            type="system",
            body=job.body,
            ts=ids.now_ms(),
        )
        await conn.execute(
            f"INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES "
            "($1, $2, $3, $4, $5, NULL, 'system', $6, $7, 'all')",
            conv,
            seq,
            event.msg_id,
            event.sender,
            event.sender_role,
            event.body,
            event.ts,
        )
        return event

    async def _transition(self, conn: Conn, job: w.Transition) -> w.Transitioned | w.Failed:
        columns = [*job.sets, *job.stamps, *job.first_stamps]
        if not w.TRANSITION_COLUMNS.issuperset(columns):
            raise ValueError(
                f"a transition may not set {sorted(set(columns) - w.TRANSITION_COLUMNS)}"
            )
        current = await conn.fetchrow(
            "SELECT state, agent_id FROM conversations WHERE id = $1 FOR UPDATE", job.conv
        )
        if current is None:
            return w.Failed(code="not_found", message=f"conversation {job.conv!r} does not exist")
        state, agent_before = current[0], current[1]
        if state not in job.from_states:
            return w.Failed(
                code="invalid_transition", message=f"conversation {job.conv!r} is {state}"
            )
        if job.if_agent is not None and agent_before != job.if_agent:
            return w.Failed(
                code="invalid_transition",
                message=f"conversation {job.conv!r} is not assigned to you",
            )
        now = ids.now_ms()
        p = _Sql()
        assignments = [f"state = {p(job.to_state)}", f"updated_at = {p(now)}"]
        assignments.append("last_seq = last_seq + 1")
        if "agent_id" in job.sets:  # remember who had it
            assignments.append("previous_agent_id = COALESCE(agent_id, previous_agent_id)")
        if job.to_state != "queued" or "agent_id" in job.sets:  # a new stay in the queue
            assignments.append("left_message_at = NULL")
        for name, value in job.sets.items():
            assignments.append(f"{name} = {p(value)}")
        for name in job.stamps:
            assignments.append(f"{name} = {p(now)}")
        for name in job.first_stamps:
            assignments.append(f"{name} = COALESCE({name}, {p(now)})")
        updated = await conn.fetchrow(
            f"UPDATE conversations SET {', '.join(assignments)} WHERE id = {p(job.conv)} "
            f"RETURNING {CONV_COLUMNS}, last_seq",
            *p.params,
        )
        assert updated is not None  # the row is locked and matched above
        agent = job.sets.get("agent_id")
        if isinstance(agent, str) and agent != updated[1]:
            await conn.execute(
                "INSERT INTO participants (conversation_id, user_id, role) "
                "VALUES ($1, $2, 'agent') ON CONFLICT DO NOTHING",
                job.conv,
                agent,
            )
        event = await self._event(conn, job.conv, updated[len(CONV_FIELDS)], job)
        return w.Transitioned(
            conv=list(updated)[: len(CONV_FIELDS)], event=event, previous_agent=agent_before
        )

    async def _successor(self, conn: Conn, job: w.Successor) -> w.Transitioned | w.Failed:
        current = await conn.fetchrow(
            "SELECT state, successor_id, customer_id FROM conversations WHERE id = $1 FOR UPDATE",
            job.conv,
        )
        if current is None:
            return w.Failed(code="not_found", message=f"conversation {job.conv!r} does not exist")
        if current[1] is not None:
            row = await conn.fetchrow(f"{_CONV_SELECT} WHERE id = $1", current[1])
            assert row is not None
            return w.Transitioned(conv=list(row))
        if current[0] != "closed":
            return w.Failed(
                code="invalid_transition",
                message=f"conversation {job.conv!r} is {current[0]}, not closed",
            )
        now = ids.now_ms()
        await conn.execute(
            "INSERT INTO conversations (id, customer_id, group_id, state, context_type, "
            "context, created_at, updated_at, previous_agent_id) "
            "SELECT $1, customer_id, group_id, 'queued', context_type, context, $2, $2, "
            "COALESCE(agent_id, previous_agent_id) FROM conversations WHERE id = $3",
            job.new_id,
            now,
            job.conv,
        )
        await conn.execute(
            "UPDATE conversations SET successor_id = $1 WHERE id = $2", job.new_id, job.conv
        )
        await conn.execute(
            "INSERT INTO participants (conversation_id, user_id, role) "
            "VALUES ($1, $2, 'customer') ON CONFLICT DO NOTHING",
            job.new_id,
            current[2],
        )
        row = await conn.fetchrow(f"{_CONV_SELECT} WHERE id = $1", job.new_id)
        assert row is not None
        return w.Transitioned(conv=list(row), created=True)

    # -- writes through the writer --------------------------------------------------------

    def submit(self, message: NewMessage) -> asyncio.Future[StoredMessage]:
        raw = self._enqueue(jobs.append_job(message))
        assert self._loop is not None
        future: asyncio.Future[StoredMessage] = self._loop.create_future()
        raw.add_done_callback(lambda done: jobs.settle(future, done.result()))
        return future

    async def _write(self, job: w.Job) -> w.Result:
        result = await self._enqueue(job)
        if isinstance(result, w.Failed):
            raise jobs.failure(result)
        return result

    async def create_conversation(
        self,
        *,
        customer_id: str,
        agent_id: str | None = None,
        group_id: str | None = None,
        context_type: str | None = None,
        context: bytes | None = None,
    ) -> Conversation:
        conv = jobs.new_conversation(
            customer_id=customer_id,
            agent_id=agent_id,
            group_id=group_id,
            context_type=context_type,
            context=context,
        )
        await self._write(jobs.create_job(conv))
        return self._remember(conv)

    async def mark_read(self, conv_id: str, user_id: str, seq: int) -> int:
        result = await self._write(w.MarkRead(conv=conv_id, user=user_id, seq=seq))
        assert isinstance(result, w.Done)
        return result.value

    async def transition(
        self,
        conv_id: str,
        *,
        from_states: Collection[ConversationState],
        to_state: ConversationState,
        event_body: bytes,
        sender: str,
        sender_role: str,
        if_agent: str | None = None,
        sets: Mapping[str, str | int | None] | None = None,
        stamps: Collection[str] = (),
        first_stamps: Collection[str] = (),
    ) -> tuple[Conversation, StoredMessage, str | None]:
        result = await self._write(
            jobs.transition_job(
                conv_id,
                from_states=from_states,
                to_state=to_state,
                event_body=event_body,
                sender=sender,
                sender_role=sender_role,
                if_agent=if_agent,
                sets=sets,
                stamps=stamps,
                first_stamps=first_stamps,
            )
        )
        assert isinstance(result, w.Transitioned)
        assert result.event is not None
        conv = self._remember(conversation_from_row(result.conv))
        return conv, jobs.stored_message(result.event), result.previous_agent

    async def successor(self, conv_id: str) -> tuple[Conversation, bool]:
        result = await self._write(w.Successor(conv=conv_id, new_id=ids.new_id()))
        assert isinstance(result, w.Transitioned)
        return self._remember(conversation_from_row(result.conv)), result.created

    # -- direct statements ----------------------------------------------------------------

    async def _read(self, kind: str, run: Callable[[Conn], Awaitable[T]]) -> T:
        if self._closed or self._pool is None:
            raise StoreClosed("the message store is closed")
        try:
            async with self._pool.acquire(timeout=self.command_timeout) as conn:
                return await run(conn)
        except STATEMENT_ERRORS as exc:
            self.metrics.store_errors.labels(operation=kind).inc()
            raise StoreError(f"{kind} failed: {exc}") from exc

    async def _update_returning(self, sql: str, *params: Any) -> Conversation | None:
        row = await self._read(
            "update", lambda conn: conn.fetchrow(f"{sql} RETURNING {CONV_COLUMNS}", *params)
        )
        return None if row is None else self._remember(conversation_from_row(row))

    async def get_conversation(self, conv_id: str, *, fresh: bool = False) -> Conversation | None:
        """Always read: other nodes change conversations (the desk decides on this)."""
        row = await self._read(
            "get_conversation", lambda conn: conn.fetchrow(f"{_CONV_SELECT} WHERE id = $1", conv_id)
        )
        if row is None:
            return None
        return self._remember(conversation_from_row(row))

    # -- hints: what a send is authorised against -------------------------------------------

    def conversation_hint(self, conv_id: str) -> Conversation | None:
        """The conversation as last read or written by this node; another node may have
        changed it since, which the append's guard catches (``NewMessage.expect``)."""
        hint = self._hints.get(conv_id)
        if hint is not None:
            self._hints.move_to_end(conv_id)
        return hint

    def forget_hint(self, conv_id: str) -> None:
        self._hints.pop(conv_id, None)

    def _remember(self, conv: Conversation) -> Conversation:
        known = self._hints.get(conv.id)
        if known is None or known.updated_at <= conv.updated_at:
            self._hints[conv.id] = conv
        self._hints.move_to_end(conv.id)
        if len(self._hints) > HINT_CACHE_SIZE:
            self._hints.popitem(last=False)
        return conv

    async def list_conversations(self, user_id: str, *, limit: int) -> list[ConversationSummary]:
        cols = ", ".join(f"c.{c}" for c in CONV_FIELDS)
        width = len(CONV_FIELDS)
        rows = await self._read(
            "list_conversations",
            lambda conn: conn.fetch(
                f"SELECT {cols}, c.last_seq, COALESCE(p.read_seq, 0), "
                "GREATEST(c.updated_at, COALESCE((SELECT ts FROM messages m "
                "WHERE m.conversation_id = c.id ORDER BY seq DESC LIMIT 1), 0)) AS active "
                "FROM conversations c LEFT JOIN participants p "
                "ON p.conversation_id = c.id AND p.user_id = $1 "
                "WHERE c.customer_id = $1 OR c.agent_id = $1 ORDER BY active DESC LIMIT $2",
                user_id,
                limit,
            ),
        )
        return [
            ConversationSummary(
                conversation=conversation_from_row(r[:width]),
                last_seq=r[width],
                read_seq=r[width + 1],
            )
            for r in rows
        ]

    async def messages_after(self, conv_id: str, after_seq: int, limit: int) -> list[StoredMessage]:
        rows = await self._read(
            "messages_after",
            lambda conn: conn.fetch(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 AND seq > $2 "
                "ORDER BY seq LIMIT $3",
                conv_id,
                after_seq,
                limit,
            ),
        )
        return [message_from_row(r) for r in rows]

    async def messages_before(
        self, conv_id: str, before_seq: int | None, limit: int
    ) -> list[StoredMessage]:
        bound = 2**62 if before_seq is None else before_seq
        rows = await self._read(
            "messages_before",
            lambda conn: conn.fetch(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 AND seq < $2 "
                "ORDER BY seq DESC LIMIT $3",
                conv_id,
                bound,
                limit,
            ),
        )
        return [message_from_row(r) for r in reversed(rows)]

    async def last_seq(self, conv_id: str) -> int:
        value = await self._read(
            "last_seq",
            lambda conn: conn.fetchval("SELECT last_seq FROM conversations WHERE id = $1", conv_id),
        )
        return int(value or 0)

    async def stamp_response(self, conv_id: str, agent_id: str) -> Conversation | None:
        now = ids.now_ms()
        return await self._update_returning(
            "UPDATE conversations SET first_response_at = COALESCE(first_response_at, $1), "
            "accepted_at = COALESCE(accepted_at, $1), updated_at = GREATEST(updated_at, $1) "
            "WHERE id = $2 AND agent_id = $3",
            now,
            conv_id,
            agent_id,
        )

    async def link_successor(self, conv_id: str, successor_id: str) -> None:
        await self._update_returning(
            "UPDATE conversations SET successor_id = $1 "
            "WHERE id = $2 AND state = 'closed' AND successor_id IS NULL",
            successor_id,
            conv_id,
        )

    async def mark_left_message(self, conv_id: str) -> None:
        await self._update_returning(
            "UPDATE conversations SET left_message_at = COALESCE(left_message_at, $1) "
            "WHERE id = $2 AND state = 'queued'",
            ids.now_ms(),
            conv_id,
        )

    async def set_labels(self, conv_id: str, labels: Collection[str]) -> Conversation:
        conv = await self._update_returning(
            "UPDATE conversations SET labels = $1, updated_at = $2 WHERE id = $3",
            json.dumps(sorted(set(labels))),
            ids.now_ms(),
            conv_id,
        )
        if conv is None:
            raise NotFound(f"conversation {conv_id!r} does not exist")
        return conv

    async def rate(self, conv_id: str, customer_id: str, score: int, comment: str) -> Conversation:
        conv = await self._update_returning(
            "UPDATE conversations SET csat_score = $1, csat_comment = $2, csat_at = $3, "
            "updated_at = GREATEST(updated_at, $3) "
            "WHERE id = $4 AND customer_id = $5 AND resolved_at IS NOT NULL "
            "AND state IN ('resolved', 'closed') AND csat_score IS NULL",
            score,
            comment,
            ids.now_ms(),
            conv_id,
            customer_id,
        )
        if conv is not None:
            return conv
        current = await self.get_conversation(conv_id, fresh=True)
        raise jobs.rating_refused(conv_id, current, customer_id)

    async def search_conversations(
        self, where: ConversationFilter, *, limit: int
    ) -> list[Conversation]:
        p = _Sql()
        clauses: list[str] = []
        if where.states:
            clauses.append(f"state = ANY({p([s.value for s in where.states])}::text[])")
        for column, value in (
            ("group_id", where.group_id),
            ("agent_id", where.agent_id),
            ("customer_id", where.customer_id),
        ):
            if value is not None:
                clauses.append(f"{column} = {p(value)}")
        if where.after is not None:
            at, after_id = p(where.after[0]), p(where.after[1])
            clauses.append(f"(updated_at < {at} OR (updated_at = {at} AND id < {after_id}))")
        if where.created_from is not None:
            clauses.append(f"created_at >= {p(where.created_from)}")
        if where.created_to is not None:
            clauses.append(f"created_at < {p(where.created_to)}")
        if where.text:
            visible = "" if where.include_internal else " AND m.visibility = 'all'"
            needle = p(where.text)
            clauses.append(
                "EXISTS (SELECT 1 FROM messages m CROSS JOIN LATERAL "
                "(SELECT convert_from(m.body, 'UTF8')::jsonb AS j) b "
                f"WHERE m.conversation_id = conversations.id AND m.type <> 'system'{visible} "
                f'AND strpos({_SEARCH_TEXT}, lower({needle} COLLATE "und-x-icu")) > 0)'
            )
        sql = _CONV_SELECT
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += f" ORDER BY updated_at DESC, id DESC LIMIT {p(limit)}"
        rows = await self._read("search_conversations", lambda conn: conn.fetch(sql, *p.params))
        return [conversation_from_row(r) for r in rows]

    async def idle_conversations(self, before: int) -> list[tuple[str, int]]:
        rows = await self._read(
            "idle_conversations",
            lambda conn: conn.fetch(
                "SELECT c.id, last.sender_role, last.ts FROM conversations c "
                "CROSS JOIN LATERAL (SELECT m.sender_role, m.ts FROM messages m "
                "WHERE m.conversation_id = c.id AND m.visibility = 'all' "
                "AND m.type <> 'system' ORDER BY m.seq DESC LIMIT 1) last "
                "WHERE c.state IN ('assigned', 'waiting')"
            ),
        )
        return [
            (r[0], int(r[2])) for r in rows if r[1] in ("agent", "admin") and int(r[2]) < before
        ]

    async def latest_agent(self, customer_id: str) -> str | None:
        value = await self._read(
            "latest_agent",
            lambda conn: conn.fetchval(
                "SELECT COALESCE(agent_id, previous_agent_id) FROM conversations "
                "WHERE customer_id = $1 AND COALESCE(agent_id, previous_agent_id) IS NOT NULL "
                "ORDER BY created_at DESC LIMIT 1",
                customer_id,
            ),
        )
        return None if value is None else str(value)

    async def save_group(self, group: Group) -> Group:
        await self._read(
            "save_group",
            lambda conn: conn.execute(
                "INSERT INTO groups (id, name, mode, welcome, max_queue, max_wait, schedule, "
                "out_of_hours_message, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
                "ON CONFLICT (id) DO UPDATE SET name = excluded.name, mode = excluded.mode, "
                "welcome = excluded.welcome, max_queue = excluded.max_queue, "
                "max_wait = excluded.max_wait, schedule = excluded.schedule, "
                "out_of_hours_message = excluded.out_of_hours_message",
                group.id,
                group.name,
                group.mode.value,
                group.welcome,
                group.max_queue,
                group.max_wait,
                None if group.schedule is None else json.dumps(group.schedule),
                group.out_of_hours_message,
                group.created_at or ids.now_ms(),
            ),
        )
        return next(g for g in await self.list_groups() if g.id == group.id)

    async def list_groups(self) -> list[Group]:
        rows = await self._read(
            "list_groups",
            lambda conn: conn.fetch(
                "SELECT id, name, mode, welcome, max_queue, max_wait, schedule, "
                "out_of_hours_message, created_at FROM groups ORDER BY id"
            ),
        )
        return [
            Group(
                id=r[0],
                name=r[1],
                mode=RoutingMode(r[2]),
                welcome=r[3],
                max_queue=r[4],
                max_wait=r[5],
                schedule=None if r[6] is None else json.loads(r[6]),
                out_of_hours_message=r[7],
                created_at=r[8],
            )
            for r in rows
        ]

    async def save_agent(self, agent: Agent) -> Agent:
        async def run(conn: Conn) -> None:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO agents (id, name, capacity, created_at) VALUES ($1, $2, $3, $4) "
                    "ON CONFLICT (id) DO UPDATE SET name = excluded.name, "
                    "capacity = excluded.capacity",
                    agent.id,
                    agent.name,
                    agent.capacity,
                    agent.created_at or ids.now_ms(),
                )
                await conn.execute(
                    "DELETE FROM agent_groups WHERE agent_id = $1 "
                    "AND NOT (group_id = ANY($2::text[]))",
                    agent.id,
                    list(agent.groups),
                )
                await conn.execute(
                    "INSERT INTO agent_groups (agent_id, group_id) "
                    "SELECT $1, g FROM unnest($2::text[]) AS g ON CONFLICT DO NOTHING",
                    agent.id,
                    list(agent.groups),
                )

        await self._read("save_agent", run)
        return next(a for a in await self.list_agents() if a.id == agent.id)

    async def list_agents(self) -> list[Agent]:
        rows = await self._read(
            "list_agents",
            lambda conn: conn.fetch(
                "SELECT a.id, a.name, a.capacity, a.created_at, "
                "COALESCE(array_agg(g.group_id ORDER BY g.group_id) "
                "FILTER (WHERE g.group_id IS NOT NULL), '{}') "
                "FROM agents a LEFT JOIN agent_groups g ON g.agent_id = a.id "
                "GROUP BY a.id ORDER BY a.id"
            ),
        )
        return [
            Agent(id=r[0], name=r[1], capacity=r[2], created_at=r[3], groups=tuple(r[4]))
            for r in rows
        ]

    async def save_canned(self, canned: CannedResponse) -> CannedResponse:
        created = canned.created_at or ids.now_ms()
        await self._read(
            "save_canned",
            lambda conn: conn.execute(
                "INSERT INTO canned_responses (id, group_id, shortcut, text, created_at) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO UPDATE SET "
                "group_id = excluded.group_id, shortcut = excluded.shortcut, "
                "text = excluded.text",
                canned.id,
                canned.group_id,
                canned.shortcut,
                canned.text,
                created,
            ),
        )
        return dataclasses.replace(canned, created_at=created)

    async def delete_canned(self, canned_id: str) -> bool:
        status = await self._read(
            "delete_canned",
            lambda conn: conn.execute("DELETE FROM canned_responses WHERE id = $1", canned_id),
        )
        return str(status) != "DELETE 0"

    async def list_canned(self, group_ids: Collection[str] | None) -> list[CannedResponse]:
        sql = "SELECT id, group_id, shortcut, text, created_at FROM canned_responses"
        params: list[Any] = []
        if group_ids is not None:
            sql += " WHERE group_id IS NULL OR group_id = ANY($1::text[])"
            params = [list(group_ids)]
        rows = await self._read(
            "list_canned", lambda conn: conn.fetch(sql + " ORDER BY shortcut", *params)
        )
        return [CannedResponse(*r) for r in rows]
