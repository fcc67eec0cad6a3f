"""The embedded store's SQLite schema, connections and row mapping (writer and readers)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

SCHEMA_VERSION = 1
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

MESSAGE_COLUMNS = (
    "conversation_id, seq, msg_id, sender_id, sender_role, client_msg_id, type, body, ts"
)
M_COLUMNS = ", ".join(f"m.{c}" for c in MESSAGE_COLUMNS.split(", "))
ROW_PLACEHOLDER = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
CONV_COLUMNS = "id, customer_id, agent_id, group_id, state, context_type, context, created_at"


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
    return conn


def apply_schema(conn: sqlite3.Connection) -> None:
    """Create what is missing; refuse a database written by a newer Kefu."""
    conn.executescript(SCHEMA)
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    if row is None:
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
    elif row[0] > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"database schema {row[0]} is newer than this Kefu ({SCHEMA_VERSION})"
        )


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


MessageRow = tuple[str, int, str, str, str, "str | None", str, bytes, int]


def message_row(row: tuple[Any, ...]) -> MessageRow:
    """A messages row with its body as bytes (SQLite may hand back a memoryview)."""
    return (row[0], row[1], row[2], row[3], row[4], row[5], row[6], bytes(row[7]), row[8])
