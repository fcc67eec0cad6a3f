"""PostgreSQL schema migrations: numbered SQL files applied in order, once each.

``src/kefu/store/pg_migrations/NNNN_name.sql`` holds the statements that take a database
from version NNNN-1 to NNNN. :func:`migrate` applies the missing ones, each in its own
transaction, under an advisory lock so that nodes starting together apply each file exactly
once; ``kefu migrate`` and every node's start-up call it. A database migrated by a newer
Kefu (a version this one does not know) is refused rather than written to.
"""

from __future__ import annotations

import dataclasses
import re
from importlib import resources

import asyncpg

#: Arbitrary, fixed: the advisory lock that serialises migrations across nodes.
MIGRATION_LOCK = 0x6B656675  # "kefu"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclasses.dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Every migration shipped with this Kefu, in version order (1, 2, ... without gaps)."""
    found = []
    for entry in resources.files("kefu.store").joinpath("pg_migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migration files are not numbered 1..N: {[m.version for m in found]}")
    return found


class SchemaTooNew(Exception):
    """The database was migrated by a newer Kefu than this one."""


async def current_version(conn: asyncpg.Connection) -> int:
    exists = await conn.fetchval("SELECT to_regclass('kefu_schema_migrations') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM kefu_schema_migrations"))


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply the missing migrations; return the versions applied (empty when current)."""
    known = migrations()
    applied: list[int] = []
    for migration in known:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS kefu_schema_migrations (version INTEGER PRIMARY KEY,"
                " name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            version = await current_version(conn)
            if version > len(known):
                raise SchemaTooNew(
                    f"database schema {version} is newer than this Kefu ({len(known)})"
                )
            if migration.version <= version:
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO kefu_schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            applied.append(migration.version)
    return applied


class MigrationFailed(Exception):
    """The database could not be reached or migrated (the message says which)."""


async def migrate_url(url: str, *, timeout: float = 5.0) -> tuple[list[int], int]:
    """Connect to ``url`` and apply the missing migrations: (versions applied, version now).

    Raises MigrationFailed when the database is unreachable, the URL malformed, the schema
    newer than this Kefu, or a migration fails.
    """
    try:
        conn = await asyncpg.connect(url, timeout=timeout)
    except (
        OSError,
        TimeoutError,
        ValueError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
    ) as exc:
        raise MigrationFailed(f"cannot reach the database: {exc or type(exc).__name__}") from exc
    try:
        applied = await migrate(conn)
        return applied, await current_version(conn)
    except SchemaTooNew as exc:
        raise MigrationFailed(str(exc)) from exc
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise MigrationFailed(f"migrating failed: {exc}") from exc
    finally:
        await conn.close()
