"""The embedded store's SQLite schema, connections and row mapping (writer and readers)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

from kefu.model import Conversation, ConversationState, StoredMessage

T = TypeVar("T")


class Row(Protocol):
    """A database row: an sqlite3 tuple or an asyncpg Record."""

    def __getitem__(self, index: int, /) -> Any: ...

    def __iter__(self) -> Iterator[Any]: ...

    def __len__(self) -> int: ...


SCHEMA_VERSION = 2
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
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_customer ON conversations (customer_id, updated_at);
CREATE INDEX IF NOT EXISTS conversations_agent ON conversations (agent_id, updated_at);
CREATE TABLE IF NOT EXISTS groups (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    mode TEXT NOT NULL,
    welcome TEXT NOT NULL,
    max_queue INTEGER NOT NULL,
    max_wait REAL NOT NULL,
    schedule TEXT,
    out_of_hours_message TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    capacity INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_groups (
    agent_id TEXT NOT NULL,
    group_id TEXT NOT NULL,
    PRIMARY KEY (agent_id, group_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS agent_groups_group ON agent_groups (group_id);
CREATE TABLE IF NOT EXISTS canned_responses (
    id TEXT PRIMARY KEY,
    group_id TEXT,
    shortcut TEXT NOT NULL,
    text TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
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
    visibility TEXT NOT NULL DEFAULT 'all',
    PRIMARY KEY (conversation_id, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS messages_idempotency
    ON messages (conversation_id, sender_id, client_msg_id);
"""

#: Columns added to ``conversations`` by schema 2 (the customer-service lifecycle).
CONVERSATION_V2_COLUMNS = (
    ("labels", "TEXT NOT NULL DEFAULT '[]'"),
    ("assigned_at", "INTEGER"),
    ("accepted_at", "INTEGER"),
    ("first_assigned_at", "INTEGER"),
    ("first_response_at", "INTEGER"),
    ("resolved_at", "INTEGER"),
    ("closed_at", "INTEGER"),
    ("close_reason", "TEXT"),
    ("previous_agent_id", "TEXT"),
    ("successor_id", "TEXT"),
    ("csat_score", "INTEGER"),
    ("csat_comment", "TEXT"),
    ("csat_at", "INTEGER"),
    ("left_message_at", "INTEGER"),
)
MIGRATIONS = {
    # version reached -> statements that take a database from the version before to it
    2: [
        *(f"ALTER TABLE conversations ADD COLUMN {n} {t}" for n, t in CONVERSATION_V2_COLUMNS),
        "ALTER TABLE messages ADD COLUMN visibility TEXT NOT NULL DEFAULT 'all'",
    ],
}
INDEXES = """
CREATE INDEX IF NOT EXISTS conversations_group_state ON conversations (group_id, state);
CREATE INDEX IF NOT EXISTS conversations_state ON conversations (state, updated_at);
CREATE INDEX IF NOT EXISTS conversations_created ON conversations (created_at);
"""

MESSAGE_COLUMNS = (
    "conversation_id, seq, msg_id, sender_id, sender_role, client_msg_id, type, body, ts, "
    "visibility"
)
M_COLUMNS = ", ".join(f"m.{c}" for c in MESSAGE_COLUMNS.split(", "))
ROW_PLACEHOLDER = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
CONV_COLUMNS = (
    "id, customer_id, agent_id, group_id, state, context_type, context, created_at, "
    "updated_at, " + ", ".join(name for name, _ in CONVERSATION_V2_COLUMNS if name != "csat_at")
)


#: SQLite page cache per connection, in KiB.
CACHE_KIB = 32 * 1024


def connect(path: Path, synchronous: str, *, readonly: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=5000")
    # Active conversations' index pages stay in memory instead of being read back.
    conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    if readonly:
        conn.execute("PRAGMA query_only=ON")
    # SQLite's lower() folds ASCII only; search needs Unicode case folding.
    conn.create_function("kefu_fold", 1, _fold, deterministic=True)
    return conn


def _fold(text: object) -> str | None:
    return text.casefold() if isinstance(text, str) else None


def apply_schema(conn: sqlite3.Connection) -> None:
    """Create what is missing, migrate an older database; refuse one from a newer Kefu."""
    fresh = (
        conn.execute("SELECT name FROM sqlite_master WHERE name = 'schema_version'").fetchone()
        is None
    )
    if fresh:
        conn.executescript(SCHEMA)
        for name, kind in CONVERSATION_V2_COLUMNS:
            conn.execute(f"ALTER TABLE conversations ADD COLUMN {name} {kind}")
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
    else:
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        version = SCHEMA_VERSION if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"database schema {version} is newer than this Kefu ({SCHEMA_VERSION})"
            )
        if version < SCHEMA_VERSION:
            conn.executescript(SCHEMA)  # the tables that are new since (existing ones stay)
            conn.execute("BEGIN IMMEDIATE")
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step]:
                    conn.execute(statement)
            conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            conn.execute("COMMIT")
    conn.executescript(INDEXES)


def dedupe_sql(keys: int) -> str:
    """Find stored messages by (conversation, sender, client_msg_id) for ``keys`` keys.

    A join with the keys as a VALUES table makes SQLite search the idempotency index once
    per key; ``(a, b, c) IN (VALUES ...)`` would scan every message instead.
    """
    values = ",".join(["(?, ?, ?)"] * keys)
    return (
        f"SELECT {M_COLUMNS} FROM (VALUES {values}) AS k JOIN messages AS m "
        "ON m.conversation_id = k.column1 AND m.sender_id = k.column2 "
        "AND m.client_msg_id = k.column3"
    )


def pow2_chunks(items: list[T], largest: int = 64) -> Iterator[list[T]]:
    """Chunks of 64, 32, ... 1 items: few distinct statements for the statement cache."""
    start, size = 0, largest
    while start < len(items):
        while size > len(items) - start:
            size //= 2
        yield items[start : start + size]
        start += size


CONV_FIELDS = tuple(CONV_COLUMNS.split(", "))


def conversation_from_row(row: Row) -> Conversation:
    """A :class:`Conversation` from a row of CONV_COLUMNS."""
    values = dict(zip(CONV_FIELDS, row, strict=True))
    context = values["context"]
    return Conversation(
        id=values["id"],
        customer_id=values["customer_id"],
        agent_id=values["agent_id"],
        group_id=values["group_id"],
        state=ConversationState(values["state"]),
        context_type=values["context_type"],
        context=None if context is None else bytes(context),
        created_at=values["created_at"],
        updated_at=values["updated_at"],
        labels=tuple(json.loads(values["labels"] or "[]")),
        assigned_at=values["assigned_at"],
        accepted_at=values["accepted_at"],
        first_assigned_at=values["first_assigned_at"],
        first_response_at=values["first_response_at"],
        resolved_at=values["resolved_at"],
        closed_at=values["closed_at"],
        close_reason=values["close_reason"],
        previous_agent_id=values["previous_agent_id"],
        successor_id=values["successor_id"],
        csat_score=values["csat_score"],
        csat_comment=values["csat_comment"],
        left_message_at=values["left_message_at"],
    )


def message_from_row(row: Row) -> StoredMessage:
    """A :class:`StoredMessage` from a row of MESSAGE_COLUMNS."""
    return StoredMessage(*message_row(row), visibility=row[9])


MessageRow = tuple[str, int, str, str, str, "str | None", str, bytes, int]


def message_row(row: Row) -> MessageRow:
    """A messages row, without visibility, its body as bytes (SQLite may give a memoryview)."""
    return (row[0], row[1], row[2], row[3], row[4], row[5], row[6], bytes(row[7]), row[8])
