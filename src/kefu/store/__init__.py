"""Message stores: the interface and its implementations, chosen by configuration."""

from __future__ import annotations

from kefu.config import Config
from kefu.metrics import Metrics
from kefu.store.base import MessageStore


def create_store(config: Config, metrics: Metrics) -> MessageStore:
    """PostgreSQL when ``database_url`` is set, else embedded SQLite under ``data_dir``."""
    if config.cluster.database_url:
        from kefu.store.postgres import PostgresStore

        return PostgresStore(
            config.cluster.database_url,
            metrics=metrics,
            max_batch=config.store.commit_max_batch,
            max_pending=config.store.max_pending_writes,
            pool_min=config.cluster.pg_pool_min,
            pool_max=config.cluster.pg_pool_max,
            command_timeout=config.cluster.pg_command_timeout,
            writers=config.cluster.pg_writers,
            commit_delay=config.cluster.pg_commit_delay,
        )
    from kefu.store.sqlite import SQLiteStore

    return SQLiteStore(
        config.data_dir / "kefu.sqlite3",
        metrics=metrics,
        synchronous=config.store.sqlite_synchronous,
        max_batch=config.store.commit_max_batch,
        read_threads=config.store.read_threads,
        max_pending=config.store.max_pending_writes,
        writer=config.store.writer,
    )


__all__ = ["MessageStore", "create_store"]
