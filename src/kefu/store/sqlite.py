"""The embedded message store: SQLite in WAL mode with group commit.

Writes go to one :class:`~kefu.store.sqlite_writer.BatchWriter`, which commits each batch
of queued jobs in one transaction and only then lets their acks go out. By default it runs
in a child process (``store.writer = "process"``): there it neither competes with the
event loop for the GIL nor holds it up on fsync, and it uses a second core. With
``store.writer = "thread"`` it runs in a thread of the node instead (one process, slower
under load). Either way the batch grows with the load, so durability costs one fsync per
batch rather than per message. Writes queued past ``max_pending`` are refused with the
retryable ``overloaded`` error instead of queueing without bound.

Reads run on a small pool of threads with their own connections (WAL lets them read while
the writer writes). The standard-library sqlite3 module is used directly: aiosqlite gives
each statement its own thread hop and cannot batch commits.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import queue
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

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
from kefu.store.sqlite_schema import (
    CONV_COLUMNS,
    MESSAGE_COLUMNS,
    connect,
    conversation_from_row,
    message_from_row,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

#: What text search looks in: a message's words (text, card title and id), decoded from its
#: JSON body and case-folded (Unicode, not only ASCII: see connect()).
SEARCH_TEXT = (
    "kefu_fold(COALESCE(json_extract(CAST(m.body AS TEXT), '$.text'), '') || ' ' || "
    "COALESCE(json_extract(CAST(m.body AS TEXT), '$.title'), '') || ' ' || "
    "COALESCE(json_extract(CAST(m.body AS TEXT), '$.id'), ''))"
)
#: Most conversations whose row is kept in memory.
CACHE_SIZE = 100_000
#: Queued writes past which new ones are refused with ``overloaded``.
DEFAULT_MAX_PENDING = 5000
OVERLOAD_RETRY_AFTER = 0.5
#: Pause before a writer process that died is started again.
RESTART_DELAY = 1.0
#: A write unanswered this long makes the store unready (a hung writer or disk).
STALL_SECONDS = 10.0
#: A write unanswered this long gets the writer killed and replaced.
KILL_AFTER_SECONDS = 15.0
#: How long closing waits for the writer to finish what it was given.
CLOSE_TIMEOUT = 30.0


BatchDone = Callable[[list["asyncio.Future[w.Result]"], list[w.Result], int, float], None]


class _Runner(abc.ABC):
    """Carries jobs to a BatchWriter and results back, in order."""

    def __init__(self, path: Path, synchronous: str, max_batch: int, done: BatchDone) -> None:
        self.path = path
        self.synchronous = synchronous
        self.max_batch = max_batch
        self.done = done

    @property
    @abc.abstractmethod
    def alive(self) -> bool: ...

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    def submit(self, job: w.Job, future: asyncio.Future[w.Result]) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None:
        """Let every submitted job finish, then stop."""

    def oldest_inflight(self) -> float:
        """Seconds the oldest unanswered write has waited (0 when unknown or none)."""
        return 0.0


class _ThreadRunner(_Runner):
    _STOP = object()

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        writer = await self._loop.run_in_executor(None, w.BatchWriter, self.path, self.synchronous)
        self._thread = threading.Thread(
            target=self._loop_forever, args=(writer,), name="kefu-store-writer", daemon=True
        )
        self._thread.start()

    def submit(self, job: w.Job, future: asyncio.Future[w.Result]) -> None:
        if not self.alive:
            raise StoreError("the store writer thread is not running")
        self._queue.put((job, future))

    def _loop_forever(self, writer: w.BatchWriter) -> None:
        assert self._loop is not None
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is self._STOP:
                break
            batch: list[Any] = [item]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is self._STOP:
                    stopping = True
                    break
                batch.append(item)
            results, seconds = writer.run([job for job, _ in batch])
            futures = [future for _, future in batch]
            self._loop.call_soon_threadsafe(self.done, futures, results, len(batch), seconds)
        writer.close()

    async def close(self) -> None:
        self._queue.put(self._STOP)
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)


class _ProcessRunner(_Runner):
    """The BatchWriter in ``python -m kefu.store.sqlite_writer``, restarted if it dies."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._outgoing: list[w.Job] = []
        self._outgoing_futures: list[asyncio.Future[w.Result]] = []
        # Request frames sent and not yet answered: (when sent, their futures).
        self._inflight: collections.deque[tuple[float, list[asyncio.Future[w.Result]]]] = (
            collections.deque()
        )
        self._flush_scheduled = False
        self._closing = False
        self._alive = False
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self._alive

    async def start(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kefu.store.sqlite_writer",
            str(self.path),
            self.synchronous,
            str(self.max_batch),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        try:
            ready = await asyncio.wait_for(self._read_frame(proc.stdout), 30)
        except (asyncio.IncompleteReadError, TimeoutError) as exc:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise StoreError(f"the store writer process did not start ({exc!r})") from exc
        if ready != w.READY or self._closing:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise StoreError("the store writer process answered nonsense or is not wanted")
        self._proc = proc
        self._alive = True
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read_replies(proc))
        if self._watchdog is None:
            self._watchdog = loop.create_task(self._watch())

    async def _watch(self) -> None:
        """Kill a writer that stopped answering (hung disk, SIGSTOP, a bug): the death
        path then fails what it had (outcome unknown, clients resend) and restarts it."""
        while not self._closing:
            await asyncio.sleep(min(1.0, KILL_AFTER_SECONDS / 4))
            proc = self._proc
            if self._alive and proc is not None and self.oldest_inflight() > KILL_AFTER_SECONDS:
                log.error(
                    "the store writer has not answered for %.1fs: killing it",
                    self.oldest_inflight(),
                )
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()

    @staticmethod
    async def _read_frame(stream: asyncio.StreamReader) -> bytes:
        (length,) = w.HEADER.unpack(await stream.readexactly(w.HEADER.size))
        return await stream.readexactly(length)

    def submit(self, job: w.Job, future: asyncio.Future[w.Result]) -> None:
        if not self._alive:
            raise StoreError("the store writer process is restarting: retry shortly")
        self._outgoing.append(job)
        self._outgoing_futures.append(future)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Send what this loop iteration queued as one frame."""
        self._flush_scheduled = False
        if not self._outgoing:
            return
        jobs, futures = self._outgoing, self._outgoing_futures
        self._outgoing, self._outgoing_futures = [], []
        proc = self._proc
        if not self._alive or proc is None or proc.stdin is None or proc.stdin.is_closing():
            self.done(futures, [_LOST] * len(futures), 0, 0.0)
            return
        self._inflight.append((time.monotonic(), futures))
        proc.stdin.write(w.frame(w.encoder.encode(jobs)))

    async def _read_replies(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while True:
                reply = w.reply_decoder.decode(await self._read_frame(proc.stdout))
                _, futures = self._inflight.popleft()
                self.done(futures, reply.results, reply.batch_size, reply.seconds)
        except (asyncio.IncompleteReadError, ConnectionError, msgspec.MsgspecError) as exc:
            if not self._closing:
                log.error("the store writer process died (%r): restarting", exc)
        finally:
            self._alive = False
            # Whatever was in flight may or may not be committed: never ack it. Clients
            # resend with the same client_msg_id and the resend finds the stored row (and
            # pushes it, if it had been stored).
            while self._inflight:
                _, futures = self._inflight.popleft()
                self.done(futures, [_LOST] * len(futures), 0, 0.0)
            if not self._closing:
                asyncio.get_running_loop().create_task(self._restart())

    async def _restart(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()
        while not self._closing:
            await asyncio.sleep(RESTART_DELAY)
            try:
                await self.start()
            except Exception as exc:  # EMFILE, ENOMEM...: keep trying
                log.error("cannot restart the store writer process: %r", exc)
            else:
                log.warning("the store writer process is back")
                return

    async def close(self) -> None:
        self._closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._flush()
        proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()  # EOF: the writer finishes every frame it has, then exits
        try:
            if self._reader is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._reader, CLOSE_TIMEOUT)
            await asyncio.wait_for(proc.wait(), CLOSE_TIMEOUT)
        except TimeoutError:
            log.error("the store writer process did not finish in time: killing it")
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    def oldest_inflight(self) -> float:
        """Seconds the oldest unanswered request frame has waited (0 when none)."""
        return time.monotonic() - self._inflight[0][0] if self._inflight else 0.0


_LOST = w.Failed(
    code="store_unavailable",
    message="the store writer stopped: outcome unknown, resend with the same client_msg_id",
)


class SQLiteStore(MessageStore):
    """SQLite (WAL) implementation of :class:`MessageStore`."""

    def __init__(
        self,
        path: Path,
        *,
        metrics: Metrics,
        synchronous: str = "FULL",
        max_batch: int = 1000,
        read_threads: int = 2,
        max_pending: int = DEFAULT_MAX_PENDING,
        writer: str = "process",
    ) -> None:
        if writer not in ("process", "thread"):
            raise ValueError("writer must be 'process' or 'thread'")
        self.path = path
        self.metrics = metrics
        self.synchronous = synchronous
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.writer = writer
        self._pending = 0
        self._runner: _Runner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = True
        self._local = threading.local()
        self._readers = concurrent.futures.ThreadPoolExecutor(
            max_workers=read_threads, thread_name_prefix="kefu-store-read"
        )
        self._conversations: collections.OrderedDict[str, Conversation] = collections.OrderedDict()

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, self.synchronous, readonly=True)
            self._local.conn = conn
        return conn

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kind = _ProcessRunner if self.writer == "process" else _ThreadRunner
        runner = kind(self.path, self.synchronous, self.max_batch, self._done)
        try:
            await runner.start()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from exc
        self._runner = runner
        self._closed = False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._runner is not None:
            await self._runner.close()
        self._readers.shutdown(wait=True)

    @property
    def pending(self) -> int:
        """Writes queued or in the transaction now running."""
        return self._pending

    # -- writes ---------------------------------------------------------------------------

    def _enqueue(self, job: w.Job) -> asyncio.Future[w.Result]:
        if self._closed or self._loop is None or self._runner is None:
            raise StoreClosed("the message store is closed")
        if self._pending >= self.max_pending:
            self.metrics.store_overloaded.inc()
            raise Overloaded(
                f"the store has {self._pending} writes queued: retry shortly",
                retry_after=OVERLOAD_RETRY_AFTER,
            )
        future: asyncio.Future[w.Result] = self._loop.create_future()
        self._runner.submit(job, future)
        self._pending += 1
        return future

    def _done(
        self,
        futures: list[asyncio.Future[w.Result]],
        results: list[w.Result],
        batch_size: int,
        seconds: float,
    ) -> None:
        """Results of one batch arrive (on the event loop)."""
        self._pending -= len(futures)
        if batch_size:
            self.metrics.store_batch_size.observe(batch_size)
            self.metrics.store_commit_seconds.observe(seconds)
        for future, result in zip(futures, results, strict=True):
            if isinstance(result, w.Failed):
                self.metrics.store_errors.labels(operation="write").inc()
            if not future.done():
                future.set_result(result)

    def submit(self, message: NewMessage) -> asyncio.Future[StoredMessage]:
        job = jobs.append_job(message)
        raw = self._enqueue(job)
        assert self._loop is not None
        future: asyncio.Future[StoredMessage] = self._loop.create_future()
        raw.add_done_callback(lambda done: jobs.settle(future, done.result()))
        return future

    async def _write(self, job: w.Job) -> int:
        result = await self._enqueue(job)
        if isinstance(result, w.Failed):
            raise jobs.failure(result)
        assert isinstance(result, w.Done)
        return result.value

    async def _exec(self, sql: str, *params: Any) -> w.Rows:
        result = await self._enqueue(w.Exec(sql=sql, params=list(params)))
        if isinstance(result, w.Failed):
            raise jobs.failure(result)
        assert isinstance(result, w.Rows)
        return result

    async def _conversation_result(self, job: w.Job) -> w.Transitioned:
        result = await self._enqueue(job)
        if isinstance(result, w.Failed):
            raise jobs.failure(result)
        assert isinstance(result, w.Transitioned)
        self._remember(conversation_from_row(result.conv))
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
        self._remember(conv)
        return conv

    def _remember(self, conv: Conversation) -> None:
        cached = self._conversations.get(conv.id)
        if cached is not None and cached.updated_at > conv.updated_at:
            return  # a read that raced a write: keep the newer row
        self._conversations[conv.id] = conv
        self._conversations.move_to_end(conv.id)
        if len(self._conversations) > CACHE_SIZE:
            self._conversations.popitem(last=False)

    async def mark_read(self, conv_id: str, user_id: str, seq: int) -> int:
        return await self._write(w.MarkRead(conv=conv_id, user=user_id, seq=seq))

    # -- reads ----------------------------------------------------------------------------

    async def _read(self, kind: str, run: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed or self._loop is None:
            raise StoreClosed("the message store is closed")

        def call() -> T:
            return run(self._reader())

        try:
            return await self._loop.run_in_executor(self._readers, call)
        except sqlite3.Error as exc:
            self.metrics.store_errors.labels(operation=kind).inc()
            raise StoreError(f"{kind} failed: {exc}") from exc
        except RuntimeError as exc:  # executor shut down under us
            raise StoreClosed("the message store is closed") from exc

    async def ping(self) -> None:
        if self._runner is None or not self._runner.alive:
            raise StoreError("the store writer is not running")
        stalled = self._runner.oldest_inflight()
        if stalled > STALL_SECONDS:
            raise StoreError(f"a write has waited {stalled:.0f}s for the store writer")
        await self._read("ping", lambda conn: conn.execute("SELECT 1").fetchone())

    def cached_conversation(self, conv_id: str) -> Conversation | None:
        cached = self._conversations.get(conv_id)
        if cached is not None:
            self._conversations.move_to_end(conv_id)
        return cached

    async def get_conversation(self, conv_id: str, *, fresh: bool = False) -> Conversation | None:
        cached = None if fresh else self._conversations.get(conv_id)
        if cached is not None:
            self._conversations.move_to_end(conv_id)
            return cached

        def run(conn: sqlite3.Connection) -> Conversation | None:
            row = conn.execute(
                f"SELECT {CONV_COLUMNS} FROM conversations WHERE id = ?", (conv_id,)
            ).fetchone()
            return None if row is None else conversation_from_row(row)

        found = await self._read("get_conversation", run)
        if found is not None:
            self._remember(found)
        return found

    async def list_conversations(self, user_id: str, *, limit: int) -> list[ConversationSummary]:
        cols = ", ".join(f"c.{c}" for c in CONV_COLUMNS.split(", "))
        width = len(CONV_COLUMNS.split(", "))

        def run(conn: sqlite3.Connection) -> list[ConversationSummary]:
            rows = conn.execute(
                f"SELECT {cols}, "
                "COALESCE((SELECT MAX(seq) FROM messages m WHERE m.conversation_id = c.id), 0),"
                " COALESCE(p.read_seq, 0), MAX(c.updated_at, COALESCE((SELECT ts FROM messages m "
                "WHERE m.conversation_id = c.id ORDER BY seq DESC LIMIT 1), 0)) AS active "
                "FROM conversations c LEFT JOIN participants p "
                "ON p.conversation_id = c.id AND p.user_id = ? "
                "WHERE c.id IN (SELECT id FROM conversations WHERE customer_id = ? "
                "UNION SELECT id FROM conversations WHERE agent_id = ?) "
                "ORDER BY active DESC LIMIT ?",
                (user_id, user_id, user_id, limit),
            ).fetchall()
            return [
                ConversationSummary(
                    conversation=conversation_from_row(r[:width]),
                    last_seq=r[width],
                    read_seq=r[width + 1],
                )
                for r in rows
            ]

        return await self._read("list_conversations", run)

    async def messages_after(self, conv_id: str, after_seq: int, limit: int) -> list[StoredMessage]:
        def run(conn: sqlite3.Connection) -> list[StoredMessage]:
            rows = conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? AND seq > ? "
                "ORDER BY seq LIMIT ?",
                (conv_id, after_seq, limit),
            ).fetchall()
            return [message_from_row(r) for r in rows]

        return await self._read("messages_after", run)

    async def messages_before(
        self, conv_id: str, before_seq: int | None, limit: int
    ) -> list[StoredMessage]:
        bound = 2**62 if before_seq is None else before_seq

        def run(conn: sqlite3.Connection) -> list[StoredMessage]:
            rows = conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? AND seq < ? "
                "ORDER BY seq DESC LIMIT ?",
                (conv_id, bound, limit),
            ).fetchall()
            return [message_from_row(r) for r in reversed(rows)]

        return await self._read("messages_before", run)

    async def last_seq(self, conv_id: str) -> int:
        def run(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT MAX(seq) FROM messages WHERE conversation_id = ?", (conv_id,)
            ).fetchone()
            return int(row[0] or 0)

        return await self._read("last_seq", run)

    # -- customer service -----------------------------------------------------------------

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
        result = await self._conversation_result(
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
        assert result.event is not None
        conv = conversation_from_row(result.conv)
        return conv, jobs.stored_message(result.event), result.previous_agent

    async def successor(self, conv_id: str) -> tuple[Conversation, bool]:
        result = await self._conversation_result(w.Successor(conv=conv_id, new_id=ids.new_id()))
        return conversation_from_row(result.conv), result.created

    async def _update_returning(self, sql: str, *params: Any) -> Conversation | None:
        result = await self._exec(f"{sql} RETURNING {CONV_COLUMNS}", *params)
        if not result.rows:
            return None
        conv = conversation_from_row(result.rows[0])
        self._remember(conv)
        return conv

    async def stamp_response(self, conv_id: str, agent_id: str) -> Conversation | None:
        now = ids.now_ms()
        return await self._update_returning(
            "UPDATE conversations SET first_response_at = COALESCE(first_response_at, ?), "
            "accepted_at = COALESCE(accepted_at, ?), updated_at = MAX(updated_at, ?) "
            "WHERE id = ? AND agent_id = ?",
            now,
            now,
            now,
            conv_id,
            agent_id,
        )

    async def link_successor(self, conv_id: str, successor_id: str) -> None:
        await self._update_returning(
            "UPDATE conversations SET successor_id = ? "
            "WHERE id = ? AND state = 'closed' AND successor_id IS NULL",
            successor_id,
            conv_id,
        )

    async def mark_left_message(self, conv_id: str) -> None:
        await self._update_returning(
            "UPDATE conversations SET left_message_at = COALESCE(left_message_at, ?) "
            "WHERE id = ? AND state = 'queued'",
            ids.now_ms(),
            conv_id,
        )

    async def set_labels(self, conv_id: str, labels: Collection[str]) -> Conversation:
        conv = await self._update_returning(
            "UPDATE conversations SET labels = ?, updated_at = ? WHERE id = ?",
            json.dumps(sorted(set(labels))),
            ids.now_ms(),
            conv_id,
        )
        if conv is None:
            raise NotFound(f"conversation {conv_id!r} does not exist")
        return conv

    async def rate(self, conv_id: str, customer_id: str, score: int, comment: str) -> Conversation:
        now = ids.now_ms()
        conv = await self._update_returning(
            "UPDATE conversations SET csat_score = ?, csat_comment = ?, csat_at = ?, "
            "updated_at = MAX(updated_at, ?) "
            "WHERE id = ? AND customer_id = ? AND resolved_at IS NOT NULL "
            "AND state IN ('resolved', 'closed') AND csat_score IS NULL",
            score,
            comment,
            now,
            now,
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
        clauses: list[str] = []
        params: list[Any] = []
        if where.states:
            clauses.append(f"state IN ({','.join('?' * len(where.states))})")
            params += [s.value for s in where.states]
        for column, value in (
            ("group_id", where.group_id),
            ("agent_id", where.agent_id),
            ("customer_id", where.customer_id),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if where.after is not None:
            clauses.append("(updated_at < ? OR (updated_at = ? AND id < ?))")
            params += [where.after[0], where.after[0], where.after[1]]
        if where.created_from is not None:
            clauses.append("created_at >= ?")
            params.append(where.created_from)
        if where.created_to is not None:
            clauses.append("created_at < ?")
            params.append(where.created_to)
        if where.text:
            visible = "" if where.include_internal else " AND m.visibility = 'all'"
            clauses.append(
                "EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = conversations.id "
                f"AND m.type <> 'system'{visible} AND instr({SEARCH_TEXT}, ?) > 0)"
            )
            params.append(where.text.casefold())
        sql = f"SELECT {CONV_COLUMNS} FROM conversations"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY updated_at DESC, id DESC LIMIT ?"
        params.append(limit)

        def run(conn: sqlite3.Connection) -> list[Conversation]:
            return [conversation_from_row(r) for r in conn.execute(sql, params).fetchall()]

        return await self._read("search_conversations", run)

    async def idle_conversations(self, before: int) -> list[tuple[str, int]]:
        def run(conn: sqlite3.Connection) -> list[tuple[str, int]]:
            rows = conn.execute(
                "SELECT c.id, (SELECT m.sender_role || ' ' || m.ts FROM messages m "
                "WHERE m.conversation_id = c.id AND m.visibility = 'all' "
                "AND m.type <> 'system' ORDER BY m.seq DESC LIMIT 1) AS last "
                "FROM conversations c WHERE c.state IN ('assigned', 'waiting')"
            ).fetchall()
            out = []
            for conv_id, last in rows:
                if last is None:
                    continue
                role, ts = last.split(" ")
                if role in ("agent", "admin") and int(ts) < before:
                    out.append((conv_id, int(ts)))
            return out

        return await self._read("idle_conversations", run)

    async def latest_agent(self, customer_id: str) -> str | None:
        def run(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT COALESCE(agent_id, previous_agent_id) FROM conversations "
                "WHERE customer_id = ? AND COALESCE(agent_id, previous_agent_id) IS NOT NULL "
                "ORDER BY created_at DESC LIMIT 1",
                (customer_id,),
            ).fetchone()
            return None if row is None else str(row[0])

        return await self._read("latest_agent", run)

    async def save_group(self, group: Group) -> Group:
        await self._exec(
            "INSERT INTO groups (id, name, mode, welcome, max_queue, max_wait, schedule, "
            "out_of_hours_message, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
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
        )
        return next(g for g in await self.list_groups() if g.id == group.id)

    async def list_groups(self) -> list[Group]:
        def run(conn: sqlite3.Connection) -> list[Group]:
            rows = conn.execute(
                "SELECT id, name, mode, welcome, max_queue, max_wait, schedule, "
                "out_of_hours_message, created_at FROM groups ORDER BY id"
            ).fetchall()
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

        return await self._read("list_groups", run)

    async def save_agent(self, agent: Agent) -> Agent:
        await self._exec(
            "INSERT INTO agents (id, name, capacity, created_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET name = excluded.name, capacity = excluded.capacity",
            agent.id,
            agent.name,
            agent.capacity,
            agent.created_at or ids.now_ms(),
        )
        await self._exec(
            "DELETE FROM agent_groups WHERE agent_id = ? AND group_id NOT IN "
            "(SELECT value FROM json_each(?))",
            agent.id,
            json.dumps(list(agent.groups)),
        )
        await self._exec(
            "INSERT OR IGNORE INTO agent_groups (agent_id, group_id) "
            "SELECT ?, value FROM json_each(?)",
            agent.id,
            json.dumps(list(agent.groups)),
        )
        return next(a for a in await self.list_agents() if a.id == agent.id)

    async def list_agents(self) -> list[Agent]:
        def run(conn: sqlite3.Connection) -> list[Agent]:
            rows = conn.execute(
                "SELECT a.id, a.name, a.capacity, a.created_at, "
                "(SELECT json_group_array(group_id) FROM (SELECT group_id FROM agent_groups g "
                "WHERE g.agent_id = a.id ORDER BY group_id)) FROM agents a ORDER BY a.id"
            ).fetchall()
            return [
                Agent(
                    id=r[0],
                    name=r[1],
                    capacity=r[2],
                    created_at=r[3],
                    groups=tuple(json.loads(r[4])),
                )
                for r in rows
            ]

        return await self._read("list_agents", run)

    async def save_canned(self, canned: CannedResponse) -> CannedResponse:
        created = canned.created_at or ids.now_ms()
        await self._exec(
            "INSERT INTO canned_responses (id, group_id, shortcut, text, created_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET group_id = excluded.group_id,"
            " shortcut = excluded.shortcut, text = excluded.text",
            canned.id,
            canned.group_id,
            canned.shortcut,
            canned.text,
            created,
        )
        return dataclasses.replace(canned, created_at=created)

    async def delete_canned(self, canned_id: str) -> bool:
        result = await self._exec("DELETE FROM canned_responses WHERE id = ?", canned_id)
        return result.rowcount > 0

    async def list_canned(self, group_ids: Collection[str] | None) -> list[CannedResponse]:
        def run(conn: sqlite3.Connection) -> list[CannedResponse]:
            sql = "SELECT id, group_id, shortcut, text, created_at FROM canned_responses"
            params: list[Any] = []
            if group_ids is not None:
                sql += (
                    " WHERE group_id IS NULL OR group_id IN "
                    f"({','.join('?' * len(group_ids)) or 'NULL'})"
                )
                params = list(group_ids)
            rows = conn.execute(sql + " ORDER BY shortcut", params).fetchall()
            return [CannedResponse(*r) for r in rows]

        return await self._read("list_canned", run)
