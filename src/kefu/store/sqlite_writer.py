"""The SQLite writer: group-committed batches of write jobs, in a thread or its own process.

:class:`BatchWriter` owns the only write connection. It takes a batch of jobs, runs them in
one transaction and commits (an fsync with ``synchronous=FULL``); the results go back only
after the commit, so an ack always means "on disk". It allocates each conversation's next
seq from an in-memory counter (one writer, so no races) seeded from the rows. Appends of a
batch cost a handful of statements whatever their number (one index-backed duplicate
lookup, multi-row INSERTs, one UPDATE). If a batch fails, its jobs are retried one per
transaction so that a single bad job fails alone.

Jobs and results are msgspec Structs so that the writer can run in a separate process
(``python -m kefu.store.sqlite_writer``), where it neither competes with the event loop
for the GIL nor stalls it on fsync; frames on its stdin/stdout are a 4-byte big-endian
length and a msgpack payload (a list of jobs in; a :class:`Reply` out per request frame).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import sqlite3
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from kefu import ids
from kefu.store.sqlite_schema import (
    CONV_COLUMNS,
    MESSAGE_COLUMNS,
    ROW_PLACEHOLDER,
    apply_schema,
    connect,
    dedupe_sql,
    message_row,
    pow2_chunks,
)

log = logging.getLogger(__name__)

#: Most conversations whose seq counter the writer keeps in memory.
SEQ_CACHE_SIZE = 100_000
#: WAL size (pages) past which the writer checkpoints itself so that the WAL restarts.
WAL_RESET_PAGES = 16000
#: Seconds between two background PASSIVE checkpoints. Each ends with an fsync of the
#: database file, and a big one delays the commits' own WAL fsyncs (the filesystem
#: flushes both): small and frequent keeps those stalls short. Measured at 5,000 msg/s
#: on 5,000 conversations with a few hundred messages each: p99 9-11 ms every 50 ms,
#: 35-54 ms every 200 ms (2% of the commits took 10-50 ms), for ~5% more node CPU.
CHECKPOINT_INTERVAL = 0.05

# -- jobs and results ----------------------------------------------------------------------


class Append(msgspec.Struct, tag="append", tag_field="k", array_like=True):
    conv: str
    sender: str
    sender_role: str
    client_msg_id: str | None
    type: str
    body: bytes
    visibility: str = "all"
    #: The conversation's state and agent the append was authorised against (checked by
    #: the PostgreSQL store; the SQLite writer is the only writer and ignores it).
    expect_state: str | None = None
    expect_agent: str | None = None

    def stored(self, seq: int, msg_id: str, ts: int) -> Stored:
        """This message, stored under ``seq``, ``msg_id`` and ``ts``."""
        return Stored(
            conv=self.conv,
            seq=seq,
            msg_id=msg_id,
            sender=self.sender,
            sender_role=self.sender_role,
            client_msg_id=self.client_msg_id,
            type=self.type,
            body=self.body,
            ts=ts,
            visibility=self.visibility,
        )


class Create(msgspec.Struct, tag="create", tag_field="k", array_like=True):
    id: str
    customer_id: str
    agent_id: str | None
    group_id: str | None
    state: str
    context_type: str | None
    context: bytes | None
    created_at: int


class MarkRead(msgspec.Struct, tag="mark_read", tag_field="k", array_like=True):
    conv: str
    user: str
    seq: int


#: A SQL parameter or column value: str, int, float, bytes or None (msgpack keeps them).
Param = Any


class Transition(msgspec.Struct, tag="transition", tag_field="k", array_like=True):
    """A lifecycle event: compare-and-set the state, change columns, record the event.

    The update applies only when the conversation is in one of ``from_states`` (and, with
    ``if_agent``, assigned to that agent); in the same transaction the event is appended
    as a ``system`` message. ``sets`` are columns to set, ``stamps`` columns to set to now
    and ``first_stamps`` columns to set to now unless already set.
    """

    conv: str
    from_states: list[str]
    to_state: str
    if_agent: str | None
    sets: dict[str, Param]
    stamps: list[str]
    first_stamps: list[str]
    sender: str
    sender_role: str
    body: bytes


class Exec(msgspec.Struct, tag="exec", tag_field="k", array_like=True):
    """One SQL statement written by the store (never by a client), run in the batch."""

    sql: str
    params: list[Param]


class Successor(msgspec.Struct, tag="successor", tag_field="k", array_like=True):
    """The open successor of a closed conversation, created if it has none yet."""

    conv: str
    new_id: str


Job = Append | Create | MarkRead | Transition | Exec | Successor


class Stored(msgspec.Struct, tag="stored", tag_field="k", array_like=True):
    """An appended (or, with ``duplicate``, an already stored) message."""

    conv: str
    seq: int
    msg_id: str
    sender: str
    sender_role: str
    client_msg_id: str | None
    type: str
    body: bytes
    ts: int
    duplicate: bool = False
    visibility: str = "all"


class Done(msgspec.Struct, tag="done", tag_field="k", array_like=True):
    value: int = 0


class Failed(msgspec.Struct, tag="failed", tag_field="k", array_like=True):
    code: str  # "not_found", "invalid_transition" or "store_unavailable"
    message: str


class Transitioned(msgspec.Struct, tag="transitioned", tag_field="k", array_like=True):
    """A conversation row (CONV_COLUMNS order) and the event message recorded with it."""

    conv: list[Param]
    event: Stored | None = None
    created: bool = False
    #: The agent the conversation had just before this transition.
    previous_agent: str | None = None


class Rows(msgspec.Struct, tag="rows", tag_field="k", array_like=True):
    rowcount: int
    rows: list[list[Param]]


Result = Stored | Done | Failed | Transitioned | Rows


class Reply(msgspec.Struct, array_like=True):
    """The results of one request frame, and the transaction that produced them."""

    results: list[Result]
    batch_size: int
    seconds: float


class NoSuchConversation(Exception):
    pass


class TransitionRefused(Exception):
    pass


#: Columns a Transition may set (its ``sets``, ``stamps`` and ``first_stamps``).
TRANSITION_COLUMNS = frozenset(
    {
        "agent_id",
        "group_id",
        "assigned_at",
        "accepted_at",
        "first_assigned_at",
        "first_response_at",
        "resolved_at",
        "closed_at",
        "close_reason",
        "previous_agent_id",
    }
)


# -- the writer ----------------------------------------------------------------------------


class BatchWriter:
    def __init__(
        self,
        path: Path,
        synchronous: str = "FULL",
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
    ) -> None:
        self.conn = connect(path, synchronous)
        apply_schema(self.conn)
        # Checkpoints copy the WAL into the database file and fsync it: tens of ms that
        # would land on whichever commit crossed the threshold. A thread of ours does most
        # of that beside the commits (PASSIVE never blocks the writer).
        # The thread keeps the WAL mostly copied; the writer's own checkpoint past
        # WAL_RESET_PAGES then has little left to do and lets the WAL start over (a
        # checkpoint beside a busy writer never catches up, so the file would grow).
        self.conn.execute(f"PRAGMA wal_autocheckpoint={WAL_RESET_PAGES}")
        self._stop = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop,
            args=(path, synchronous, checkpoint_interval),
            name="kefu-store-checkpoint",
            daemon=True,
        )
        self._checkpointer.start()
        self._last_seq: dict[str, int] = {}
        self._dirty: set[str] = set()

    def _checkpoint_loop(self, path: Path, synchronous: str, interval: float) -> None:
        conn = connect(path, synchronous)
        try:
            while not self._stop.wait(interval):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # busy or I/O trouble: try again later
                    log.warning("checkpoint failed: %s", exc)
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._checkpointer.join()
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        self.conn.close()

    def run(self, jobs: list[Job]) -> tuple[list[Result], float]:
        """Run ``jobs`` in one transaction; returns the results and its duration."""
        started = time.perf_counter()
        results: list[Result | None] = [None] * len(jobs)
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            appends: list[int] = []
            for i, job in enumerate(jobs):
                if isinstance(job, Append):
                    appends.append(i)
                    continue
                if appends:  # keep seq order: appends before this job go first
                    self._flush_appends(jobs, appends, results)
                if isinstance(job, Create):
                    results[i] = self._create(job)
                elif isinstance(job, MarkRead):
                    results[i] = self._mark_read(job)
                elif isinstance(job, Transition):
                    results[i] = self._transition(job)
                elif isinstance(job, Exec):
                    cursor = conn.execute(job.sql, job.params)
                    rows = [list(row) for row in cursor.fetchall()]
                    results[i] = Rows(rowcount=cursor.rowcount, rows=rows)
                else:
                    results[i] = self._successor(job)
            if appends:
                self._flush_appends(jobs, appends, results)
            conn.execute("COMMIT")
        except Exception as exc:
            self._rollback()
            if isinstance(exc, sqlite3.OperationalError):  # busy, I/O, full: the whole batch
                log.error("batch of %d failed: %s", len(jobs), exc)
                failed = Failed(code="store_unavailable", message=f"store error: {exc}")
                return [failed] * len(jobs), time.perf_counter() - started
            if len(jobs) > 1:
                log.warning("batch of %d failed (%s): retrying one by one", len(jobs), exc)
                out = [self.run([job])[0][0] for job in jobs]
                return out, time.perf_counter() - started
            if isinstance(exc, NoSuchConversation):
                code = "not_found"
            elif isinstance(exc, TransitionRefused):
                code = "invalid_transition"
            else:
                code = "store_unavailable"
            return [Failed(code=code, message=str(exc))], time.perf_counter() - started
        finally:
            self._dirty.clear()
            while len(self._last_seq) > SEQ_CACHE_SIZE:  # oldest first; reloaded on demand
                del self._last_seq[next(iter(self._last_seq))]
        return results, time.perf_counter() - started  # type: ignore[return-value]

    def _flush_appends(
        self, jobs: list[Job], appends: list[int], results: list[Result | None]
    ) -> None:
        stored = self._append_many([jobs[i] for i in appends])  # type: ignore[misc]
        for i, result in zip(appends, stored, strict=True):
            results[i] = result
        appends.clear()

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("ROLLBACK")
        # Counters may have advanced for rows that are gone: reload them from the rows.
        for conv in self._dirty:
            self._last_seq.pop(conv, None)

    def _next_seq(self, conv: str) -> int:
        last = self._last_seq.get(conv)
        if last is None:
            row = self.conn.execute(
                "SELECT (SELECT MAX(seq) FROM messages WHERE conversation_id = ?) "
                "FROM conversations WHERE id = ?",
                (conv, conv),
            ).fetchone()
            if row is None:
                raise NoSuchConversation(f"conversation {conv!r} does not exist")
            last = row[0] or 0
        last += 1
        self._last_seq[conv] = last
        self._dirty.add(conv)
        return last

    def _append_many(self, jobs: list[Append]) -> list[Stored]:
        keys = [(j.conv, j.sender, j.client_msg_id) for j in jobs if j.client_msg_id is not None]
        existing: dict[tuple[str, str, str | None], Stored] = {}
        for chunk in pow2_chunks(keys):
            for row in self.conn.execute(
                dedupe_sql(len(chunk)), [v for key in chunk for v in key]
            ).fetchall():
                found = Stored(*message_row(row), duplicate=True, visibility=row[9])
                existing[(found.conv, found.sender, found.client_msg_id)] = found
        out: list[Stored] = []
        rows: list[tuple[Any, ...]] = []
        now = ids.now_ms()
        for job in jobs:
            key = (job.conv, job.sender, job.client_msg_id)
            before = existing.get(key) if job.client_msg_id is not None else None
            if before is not None:
                out.append(before)
                continue
            stored = job.stored(self._next_seq(job.conv), ids.new_id(), now)
            if job.client_msg_id is not None:  # a resend later in this same batch
                existing[key] = msgspec.structs.replace(stored, duplicate=True)
            out.append(stored)
            rows.append(_as_row(stored))
        for chunk in pow2_chunks(rows):
            self.conn.execute(
                f"INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES "
                + ",".join([ROW_PLACEHOLDER] * len(chunk)),
                [v for row in chunk for v in row],
            )
        return out

    def _create(self, job: Create) -> Done:
        self.conn.execute(
            # OR IGNORE: a job resent after a writer restart may have committed already.
            "INSERT OR IGNORE INTO conversations (id, customer_id, agent_id, group_id, state, "
            "context_type, context, created_at, updated_at, assigned_at, first_assigned_at, "
            "accepted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job.id,
                job.customer_id,
                job.agent_id,
                job.group_id,
                job.state,
                job.context_type,
                job.context,
                job.created_at,
                job.created_at,
                job.created_at if job.agent_id else None,
                job.created_at if job.agent_id else None,
                job.created_at if job.agent_id else None,
            ),
        )
        rows = [(job.id, job.customer_id, "customer")]
        if job.agent_id is not None and job.agent_id != job.customer_id:
            rows.append((job.id, job.agent_id, "agent"))
        self.conn.executemany(
            "INSERT OR IGNORE INTO participants (conversation_id, user_id, role) VALUES (?, ?, ?)",
            rows,
        )
        self._last_seq[job.id] = 0
        return Done()

    def _conversation_row(self, conv: str) -> list[Param] | None:
        row = self.conn.execute(
            f"SELECT {CONV_COLUMNS} FROM conversations WHERE id = ?", (conv,)
        ).fetchone()
        return None if row is None else list(row)

    def _transition(self, job: Transition) -> Transitioned:
        columns = [*job.sets, *job.stamps, *job.first_stamps]
        if not TRANSITION_COLUMNS.issuperset(columns):
            raise ValueError(
                f"a transition may not set {sorted(set(columns) - TRANSITION_COLUMNS)}"
            )
        now = ids.now_ms()
        assignments = ["state = ?", "updated_at = ?"]
        params: list[Param] = [job.to_state, now]
        if "agent_id" in job.sets:  # remember who had it
            assignments.append("previous_agent_id = COALESCE(agent_id, previous_agent_id)")
        if job.to_state != "queued" or "agent_id" in job.sets:  # a new stay in the queue
            assignments.append("left_message_at = NULL")
        for name, value in job.sets.items():
            assignments.append(f"{name} = ?")
            params.append(value)
        for name in job.stamps:
            assignments.append(f"{name} = ?")
            params.append(now)
        for name in job.first_stamps:
            assignments.append(f"{name} = COALESCE({name}, ?)")
            params.append(now)
        before = self.conn.execute(
            "SELECT agent_id FROM conversations WHERE id = ?", (job.conv,)
        ).fetchone()
        where = f"id = ? AND state IN ({','.join('?' * len(job.from_states))})"
        params += [job.conv, *job.from_states]
        if job.if_agent is not None:
            where += " AND agent_id = ?"
            params.append(job.if_agent)
        updated = self.conn.execute(
            f"UPDATE conversations SET {', '.join(assignments)} WHERE {where} "
            f"RETURNING {CONV_COLUMNS}",
            params,
        ).fetchone()
        if updated is None:
            current = self._conversation_row(job.conv)
            if current is None:
                raise NoSuchConversation(f"conversation {job.conv!r} does not exist")
            state, agent = current[4], current[2]
            if job.if_agent is not None and agent != job.if_agent and state in job.from_states:
                raise TransitionRefused(f"conversation {job.conv!r} is not assigned to you")
            raise TransitionRefused(f"conversation {job.conv!r} is {state}")
        agent = job.sets.get("agent_id")
        if isinstance(agent, str) and agent != updated[1]:
            self.conn.execute(
                "INSERT OR IGNORE INTO participants (conversation_id, user_id, role) "
                "VALUES (?, ?, 'agent')",
                (job.conv, agent),
            )
        (event,) = self._append_many(
            [Append(job.conv, job.sender, job.sender_role, None, "system", job.body)]
        )
        return Transitioned(conv=list(updated), event=event, previous_agent=before[0])

    def _successor(self, job: Successor) -> Transitioned:
        current = self._conversation_row(job.conv)
        if current is None:
            raise NoSuchConversation(f"conversation {job.conv!r} does not exist")
        successor = current[CONV_COLUMNS.split(", ").index("successor_id")]
        if successor is not None:
            row = self._conversation_row(str(successor))
            assert row is not None
            return Transitioned(conv=row)
        if current[4] != "closed":
            raise TransitionRefused(f"conversation {job.conv!r} is {current[4]}, not closed")
        now = ids.now_ms()
        self.conn.execute(
            "INSERT INTO conversations (id, customer_id, group_id, state, context_type, "
            "context, created_at, updated_at, previous_agent_id) "
            "SELECT ?, customer_id, group_id, 'queued', context_type, context, ?, ?, "
            "COALESCE(agent_id, previous_agent_id) FROM conversations WHERE id = ?",
            (job.new_id, now, now, job.conv),
        )
        self.conn.execute(
            "UPDATE conversations SET successor_id = ? WHERE id = ?", (job.new_id, job.conv)
        )
        self.conn.execute(
            "INSERT OR IGNORE INTO participants (conversation_id, user_id, role) "
            "VALUES (?, ?, 'customer')",
            (job.new_id, current[1]),
        )
        self._last_seq[job.new_id] = 0
        row = self._conversation_row(job.new_id)
        assert row is not None
        return Transitioned(conv=row, created=True)

    def _mark_read(self, job: MarkRead) -> Done:
        row = self.conn.execute(
            "UPDATE participants SET read_seq = MAX(read_seq, ?) "
            "WHERE conversation_id = ? AND user_id = ? RETURNING read_seq",
            (job.seq, job.conv, job.user),
        ).fetchone()
        return Done(value=int(row[0]) if row else 0)


def _as_row(s: Stored) -> tuple[Any, ...]:
    return (
        s.conv,
        s.seq,
        s.msg_id,
        s.sender,
        s.sender_role,
        s.client_msg_id,
        s.type,
        s.body,
        s.ts,
        s.visibility,
    )


# -- the writer process --------------------------------------------------------------------

HEADER = struct.Struct("!I")
job_decoder = msgspec.msgpack.Decoder(list[Job])
reply_decoder = msgspec.msgpack.Decoder(Reply)
encoder = msgspec.msgpack.Encoder()
READY = b"ready"


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


class FrameReader:
    """Length-prefixed frames from a file descriptor, blocking or not."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()
        self.eof = False

    def _take(self) -> bytes | None:
        if len(self.buf) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self.buf)
        end = HEADER.size + length
        if len(self.buf) < end:
            return None
        payload = bytes(self.buf[HEADER.size : end])
        del self.buf[:end]
        return payload

    def read(self, *, block: bool) -> bytes | None:
        while True:
            payload = self._take()
            if payload is not None or self.eof:
                return payload
            if not block and not select.select([self.fd], [], [], 0)[0]:
                return None
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                self.eof = True
            self.buf += chunk


def serve(path: Path, synchronous: str, max_batch: int) -> None:
    """The process's main loop: read request frames, commit them in batches, reply."""
    writer = BatchWriter(path, synchronous)
    reader = FrameReader(sys.stdin.fileno())
    out = sys.stdout.fileno()
    os.write(out, frame(READY))
    while True:
        first = reader.read(block=True)
        if first is None:
            break
        requests = [job_decoder.decode(first)]
        count = len(requests[0])
        while count < max_batch:
            more = reader.read(block=False)
            if more is None:
                break
            requests.append(job_decoder.decode(more))
            count += len(requests[-1])
        jobs = [job for request in requests for job in request]
        results, seconds = writer.run(jobs)
        replies, start = bytearray(), 0
        for request in requests:
            part = results[start : start + len(request)]
            start += len(request)
            replies += frame(encoder.encode(Reply(part, len(jobs), seconds)))
        view = memoryview(replies)
        while view:
            view = view[os.write(out, view) :]
    writer.close()


def main() -> None:  # pragma: no cover - exercised through the process store tests
    path, synchronous, max_batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    logging.basicConfig(level=logging.WARNING, format="kefu-store-writer: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        serve(Path(path), synchronous, max_batch)


if __name__ == "__main__":  # pragma: no cover
    main()
