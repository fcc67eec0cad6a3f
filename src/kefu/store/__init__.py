"""Message stores: the interface and its implementations, chosen by configuration."""

from __future__ import annotations

from kefu.config import Config
from kefu.metrics import Metrics
from kefu.store.base import MessageStore


def create_store(config: Config, metrics: Metrics) -> MessageStore:
    """The store the configuration names (embedded SQLite under ``data_dir`` for now)."""
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
