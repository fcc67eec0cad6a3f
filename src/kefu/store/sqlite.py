"""The embedded message store: SQLite in WAL mode with group commit.

One writer thread owns the only write connection. Coroutines hand it jobs through a
queue; it takes every job waiting (up to ``commit_max_batch``), runs them in one
transaction, commits (an fsync with ``synchronous=FULL``) and only then resolves the
callers' futures, all in one hop back to the event loop. While a commit is on disk the next
batch gathers, so the batch grows with the load and durability costs one fsync per batch
rather than per message. Because there is one writer, it can allocate each conversation's
next seq from an in-memory counter without races. If a batch fails, its jobs are retried one
per transaction so that a single bad job fails alone.

Reads run on a small pool of threads with their own connections (WAL lets them read
while the writer writes). The standard-library sqlite3 module is used directly: aiosqlite
would give each statement its own thread hop and could not batch commits.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from kefu import ids
from kefu.errors import NotFound, Overloaded, StoreClosed, StoreError
from kefu.metrics import Metrics
from kefu.model import (
    Conversation,
    ConversationState,
    ConversationSummary,
    NewMessage,
    StoredMessage,
)
from kefu.store.base import MessageStore

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA_VERSION = 1
#: Most conversations whose row and seq counter are kept in memory.
CACHE_SIZE = 100_000
SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL,
    agent_id TEXT,
    group_id TEXT,
    state TEXT NOT NULL,
    context_type TEXT,
    context BLOB,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS conversations_customer ON conversations (customer_id, updated_at);
CREATE INDEX IF NOT EXISTS conversations_agent ON conversations (agent_id, updated_at);
CREATE TABLE IF NOT EXISTS participants (
    conversation_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    role TEXT NOT NULL,
    read_seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (conversation_id, user_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS participants_user ON participants (user_id);
CREATE TABLE IF NOT EXISTS messages (
    conversation_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    msg_id TEXT NOT NULL,
    sender_id TEXT NOT NULL,
    sender_role TEXT NOT NULL,
    client_msg_id TEXT,
    type TEXT NOT NULL,
    body BLOB NOT NULL,
    ts INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS messages_idempotency
    ON messages (conversation_id, sender_id, client_msg_id);
"""

_MESSAGE_COLUMNS = (
    "conversation_id, seq, msg_id, sender_id, sender_role, client_msg_id, type, body, ts"
)
_M_COLUMNS = ", ".join(f"m.{c}" for c in _MESSAGE_COLUMNS.split(", "))
_ROW_PLACEHOLDER = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
#: Queued writes past which new ones are refused with ``overloaded``.
DEFAULT_MAX_PENDING = 5000
OVERLOAD_RETRY_AFTER = 0.5
_CONV_COLUMNS = "id, customer_id, agent_id, group_id, state, context_type, context, created_at"


def dedupe_sql(keys: int) -> str:
    """Find stored messages by (conversation, sender, client_msg_id) for ``keys`` keys."""
    values = ",".join(["(?, ?, ?)"] * keys)
    return (
        f"SELECT {_M_COLUMNS} FROM (VALUES {values}) AS k JOIN messages AS m "
        "ON m.conversation_id = k.column1 AND m.sender_id = k.column2 "
        "AND m.client_msg_id = k.column3"
    )


def _pow2_chunks(items: list[T], largest: int = 64) -> Iterator[list[T]]:
    """Chunks of 64, 32, ... 1 rows: few distinct statements for the statement cache."""
    start, size = 0, largest
    while start < len(items):
        while size > len(items) - start:
            size //= 2
        yield items[start : start + size]
        start += size


def _row_to_message(row: tuple[Any, ...]) -> StoredMessage:
    return StoredMessage(
        conv=row[0],
        seq=row[1],
        msg_id=row[2],
        sender=row[3],
        sender_role=row[4],
        client_msg_id=row[5],
        type=row[6],
        body=bytes(row[7]),
        ts=row[8],
    )


def _row_to_conversation(row: tuple[Any, ...]) -> Conversation:
    return Conversation(
        id=row[0],
        customer_id=row[1],
        agent_id=row[2],
        group_id=row[3],
        state=ConversationState(row[4]),
        context_type=row[5],
        context=None if row[6] is None else bytes(row[6]),
        created_at=row[7],
    )


@dataclasses.dataclass(slots=True)
class _Job:
    """One unit of work for the writer thread."""

    run: Callable[[sqlite3.Connection], Any] | None
    future: asyncio.Future[Any]
    kind: str
    message: NewMessage | None = None
    result: Any = None
    error: BaseException | None = None


_STOP = object()


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
    ) -> None:
        self.path = path
        self.metrics = metrics
        self.synchronous = synchronous
        self.max_batch = max_batch
        self.max_pending = max_pending
        self._pending = 0
        self._jobs: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = True
        self._local = threading.local()
        self._readers = concurrent.futures.ThreadPoolExecutor(
            max_workers=read_threads, thread_name_prefix="kefu-store-read"
        )
        # Bounded caches: conversation rows (event loop) and seq counters (writer thread).
        self._conversations: collections.OrderedDict[str, Conversation] = collections.OrderedDict()
        # Writer-thread state: next seq per conversation (absent = read from the database).
        self._last_seq: dict[str, int] = {}
        self._dirty: set[str] = set()

    # -- connections ----------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA foreign_keys=OFF")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
        return conn

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = await self._loop.run_in_executor(self._readers, self._open_writer)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from exc
        self._closed = False
        self._writer = threading.Thread(
            target=self._write_loop, args=(conn,), name="kefu-store-writer", daemon=True
        )
        self._writer.start()

    def _open_writer(self) -> sqlite3.Connection:
        conn = self._connect()
        conn.executescript(SCHEMA)
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        if row is None:
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif row[0] > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"database schema {row[0]} is newer than this Kefu ({SCHEMA_VERSION})"
            )
        return conn

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._jobs.put(_STOP)
        writer = self._writer
        if writer is not None:
            await asyncio.get_running_loop().run_in_executor(None, writer.join)
        self._readers.shutdown(wait=True)

    # -- the writer -----------------------------------------------------------------------

    def _enqueue(
        self,
        kind: str,
        run: Callable[[sqlite3.Connection], T] | None,
        message: NewMessage | None = None,
    ) -> asyncio.Future[T]:
        if self._closed or self._loop is None:
            raise StoreClosed("the message store is closed")
        if self._pending >= self.max_pending:
            self.metrics.store_overloaded.inc()
            raise Overloaded(
                f"the store has {self._pending} writes queued: retry shortly",
                retry_after=OVERLOAD_RETRY_AFTER,
            )
        future: asyncio.Future[T] = self._loop.create_future()
        self._pending += 1
        self._jobs.put(_Job(run=run, future=future, kind=kind, message=message))
        return future

    async def _submit(self, kind: str, run: Callable[[sqlite3.Connection], T]) -> T:
        return await self._enqueue(kind, run)

    @property
    def pending(self) -> int:
        """Writes queued or in the transaction now running."""
        return self._pending

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        stopping = False
        while not stopping:
            first = self._jobs.get()
            if first is _STOP:
                break
            batch: list[_Job] = [first]  # type: ignore[list-item]
            while len(batch) < self.max_batch:
                try:
                    item = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)  # type: ignore[arg-type]
            self._run_batch(conn, batch)
        conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        started = time.perf_counter()
        try:
            conn.execute("BEGIN IMMEDIATE")
            appends: list[_Job] = []
            for job in batch:
                if job.run is None:
                    appends.append(job)
                else:
                    job.result = job.run(conn)
            if appends:
                self._append_many(conn, appends)
            self._flush_seq(conn)
            conn.execute("COMMIT")
        except Exception as exc:  # the whole batch is undone; retry each job alone
            log.warning("store batch of %d failed (%s); retrying one by one", len(batch), exc)
            self._rollback(conn)
            self.metrics.store_errors.labels(operation="batch").inc()
            if len(batch) > 1:
                for job in batch:
                    job.result = None
                    self._run_batch(conn, [job])
                return
            batch[0].error = exc
        else:
            self.metrics.store_batch_size.observe(len(batch))
            self.metrics.store_commit_seconds.observe(time.perf_counter() - started)
        self._dirty.clear()
        while len(self._last_seq) > CACHE_SIZE:  # oldest first; reloaded from rows on demand
            del self._last_seq[next(iter(self._last_seq))]
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._resolve, batch)

    def _rollback(self, conn: sqlite3.Connection) -> None:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        # Counters may have advanced for rows that are gone: reload them from the database.
        for conv in self._dirty:
            self._last_seq.pop(conv, None)
        self._dirty.clear()

    def _flush_seq(self, conn: sqlite3.Connection) -> None:
        """Record the batch's new last seqs: one statement however many conversations."""
        if not self._dirty:
            return
        dirty = sorted(self._dirty)
        for chunk in _pow2_chunks(dirty):
            conn.execute(
                "UPDATE conversations SET updated_at = ?, last_seq = (SELECT MAX(seq) FROM "
                "messages WHERE conversation_id = conversations.id) "
                f"WHERE id IN ({','.join('?' * len(chunk))})",
                (ids.now_ms(), *chunk),
            )

    def _append_many(self, conn: sqlite3.Connection, jobs: list[_Job]) -> None:
        """Store a batch of messages with a handful of statements.

        Each statement releases and retakes the GIL, so the work per batch, not per
        message, decides how much the writer thread slows the event loop.
        """
        keys = [
            (m.conv, m.sender, m.client_msg_id)
            for m in (j.message for j in jobs)
            if m is not None and m.client_msg_id is not None
        ]
        existing: dict[tuple[str, str, str | None], StoredMessage] = {}
        for chunk in _pow2_chunks(keys):
            # A join with the keys as a VALUES table: SQLite looks each key up in the
            # idempotency index (a row-value IN (VALUES ...) would scan the table).
            rows = conn.execute(
                dedupe_sql(len(chunk)), [v for key in chunk for v in key]
            ).fetchall()
            for row in rows:
                found = _row_to_message(row)
                existing[(found.conv, found.sender, found.client_msg_id)] = found
        rows_out: list[tuple[Any, ...]] = []
        now = ids.now_ms()
        for job in jobs:
            m = job.message
            assert m is not None
            key = (m.conv, m.sender, m.client_msg_id)
            before = existing.get(key) if m.client_msg_id is not None else None
            if before is not None:
                job.result = dataclasses.replace(before, duplicate=True)
                continue
            stored = StoredMessage(
                conv=m.conv,
                seq=self._next_seq(conn, m.conv),
                msg_id=ids.new_id(),
                sender=m.sender,
                sender_role=m.sender_role.value,
                client_msg_id=m.client_msg_id,
                type=m.type,
                body=m.body,
                ts=now,
            )
            if m.client_msg_id is not None:
                existing[key] = stored  # a resend later in this same batch
            job.result = stored
            rows_out.append(
                (
                    stored.conv,
                    stored.seq,
                    stored.msg_id,
                    stored.sender,
                    stored.sender_role,
                    stored.client_msg_id,
                    stored.type,
                    stored.body,
                    stored.ts,
                )
            )
        for chunk in _pow2_chunks(rows_out):
            conn.execute(
                f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES "
                + ",".join([_ROW_PLACEHOLDER] * len(chunk)),
                [v for row in chunk for v in row],
            )

    def _resolve(self, batch: list[_Job]) -> None:
        self._pending -= len(batch)
        for job in batch:
            if job.future.done():
                continue
            if job.error is None:
                job.future.set_result(job.result)
            elif isinstance(job.error, StoreError | NotFound):
                job.future.set_exception(job.error)
            else:
                job.future.set_exception(StoreError(f"{job.kind} failed: {job.error}"))

    def _next_seq(self, conn: sqlite3.Connection, conv: str) -> int:
        last = self._last_seq.get(conv)
        if last is None:
            row = conn.execute(
                "SELECT last_seq FROM conversations WHERE id = ?", (conv,)
            ).fetchone()
            if row is None:
                raise NotFound(f"conversation {conv!r} does not exist")
            top = conn.execute(
                "SELECT MAX(seq) FROM messages WHERE conversation_id = ?", (conv,)
            ).fetchone()
            last = max(row[0], top[0] or 0)
        last += 1
        self._last_seq[conv] = last
        self._dirty.add(conv)
        return last

    # -- writes ---------------------------------------------------------------------------

    def submit(self, message: NewMessage) -> asyncio.Future[StoredMessage]:
        return self._enqueue("append", None, message)

    async def create_conversation(
        self,
        *,
        customer_id: str,
        agent_id: str | None = None,
        group_id: str | None = None,
        context_type: str | None = None,
        context: bytes | None = None,
    ) -> Conversation:
        conv = Conversation(
            id=ids.new_id(),
            customer_id=customer_id,
            agent_id=agent_id,
            group_id=group_id,
            state=ConversationState.ASSIGNED if agent_id else ConversationState.QUEUED,
            context_type=context_type,
            context=context,
            created_at=ids.now_ms(),
        )

        def run(conn: sqlite3.Connection) -> Conversation:
            conn.execute(
                f"INSERT INTO conversations ({_CONV_COLUMNS}, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    conv.id,
                    conv.customer_id,
                    conv.agent_id,
                    conv.group_id,
                    conv.state.value,
                    conv.context_type,
                    conv.context,
                    conv.created_at,
                    conv.created_at,
                ),
            )
            rows = [(conv.id, customer_id, "customer")]
            if agent_id is not None and agent_id != customer_id:
                rows.append((conv.id, agent_id, "agent"))
            conn.executemany(
                "INSERT INTO participants (conversation_id, user_id, role) VALUES (?, ?, ?)", rows
            )
            self._last_seq[conv.id] = 0
            return conv

        created = await self._submit("create_conversation", run)
        self._remember(created)
        return created

    def _remember(self, conv: Conversation) -> None:
        self._conversations[conv.id] = conv
        self._conversations.move_to_end(conv.id)
        if len(self._conversations) > CACHE_SIZE:
            self._conversations.popitem(last=False)

    async def mark_read(self, conv_id: str, user_id: str, seq: int) -> int:
        def run(conn: sqlite3.Connection) -> int:
            conn.execute(
                "UPDATE participants SET read_seq = MAX(read_seq, ?) "
                "WHERE conversation_id = ? AND user_id = ?",
                (seq, conv_id, user_id),
            )
            row = conn.execute(
                "SELECT read_seq FROM participants WHERE conversation_id = ? AND user_id = ?",
                (conv_id, user_id),
            ).fetchone()
            return int(row[0]) if row else 0

        return await self._submit("mark_read", run)

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
        if self._writer is None or not self._writer.is_alive():
            raise StoreError("the store writer is not running")
        await self._read("ping", lambda conn: conn.execute("SELECT 1").fetchone())

    def cached_conversation(self, conv_id: str) -> Conversation | None:
        cached = self._conversations.get(conv_id)
        if cached is not None:
            self._conversations.move_to_end(conv_id)
        return cached

    async def get_conversation(self, conv_id: str) -> Conversation | None:
        cached = self._conversations.get(conv_id)
        if cached is not None:
            self._conversations.move_to_end(conv_id)
            return cached

        def run(conn: sqlite3.Connection) -> Conversation | None:
            row = conn.execute(
                f"SELECT {_CONV_COLUMNS} FROM conversations WHERE id = ?", (conv_id,)
            ).fetchone()
            return None if row is None else _row_to_conversation(row)

        found = await self._read("get_conversation", run)
        if found is not None:
            self._remember(found)
        return found

    async def list_conversations(self, user_id: str, *, limit: int) -> list[ConversationSummary]:
        cols = ", ".join(f"c.{c.strip()}" for c in _CONV_COLUMNS.split(","))

        def run(conn: sqlite3.Connection) -> list[ConversationSummary]:
            rows = conn.execute(
                f"SELECT {cols}, c.last_seq, p.read_seq FROM participants p "
                "JOIN conversations c ON c.id = p.conversation_id "
                "WHERE p.user_id = ? ORDER BY c.updated_at DESC LIMIT ?",
                (user_id, limit),
            ).fetchall()
            return [
                ConversationSummary(
                    conversation=_row_to_conversation(r[:8]), last_seq=r[8], read_seq=r[9]
                )
                for r in rows
            ]

        return await self._read("list_conversations", run)

    async def messages_after(self, conv_id: str, after_seq: int, limit: int) -> list[StoredMessage]:
        def run(conn: sqlite3.Connection) -> list[StoredMessage]:
            rows = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? AND seq > ? "
                "ORDER BY seq LIMIT ?",
                (conv_id, after_seq, limit),
            ).fetchall()
            return [_row_to_message(r) for r in rows]

        return await self._read("messages_after", run)

    async def messages_before(
        self, conv_id: str, before_seq: int | None, limit: int
    ) -> list[StoredMessage]:
        bound = 2**62 if before_seq is None else before_seq

        def run(conn: sqlite3.Connection) -> list[StoredMessage]:
            rows = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? AND seq < ? "
                "ORDER BY seq DESC LIMIT ?",
                (conv_id, bound, limit),
            ).fetchall()
            return [_row_to_message(r) for r in reversed(rows)]

        return await self._read("messages_before", run)

    async def last_seq(self, conv_id: str) -> int:
        def run(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT MAX(seq) FROM messages WHERE conversation_id = ?", (conv_id,)
            ).fetchone()
            return int(row[0] or 0)

        return await self._read("last_seq", run)
