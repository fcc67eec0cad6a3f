"""The message-store contract, run against every store implementation.

The embedded SQLite store (its writer in a process or a thread) and PostgreSQL (a fresh
database on the test run's throwaway server).
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from kefu.errors import NotFound, StaleConversation, StoreClosed
from kefu.metrics import Metrics
from kefu.model import ConversationState, NewMessage, Role
from kefu.store.base import MessageStore
from kefu.store.postgres import PostgresStore
from kefu.store.sqlite import SQLiteStore

StoreFactory = Callable[[Path, Metrics], MessageStore]

STORES: dict[str, StoreFactory] = {
    "sqlite-process": lambda path, metrics: SQLiteStore(path / "kefu.sqlite3", metrics=metrics),
    "sqlite-thread": lambda path, metrics: SQLiteStore(
        path / "kefu.sqlite3", metrics=metrics, writer="thread"
    ),
}


@pytest.fixture(params=[*sorted(STORES), "postgres", "postgres-2-writers"])
def factory(request: pytest.FixtureRequest) -> StoreFactory:
    if request.param.startswith("postgres"):
        url: str = request.getfixturevalue("postgres_url")
        writers = 2 if request.param == "postgres-2-writers" else 1
        return lambda path, metrics: PostgresStore(url, metrics=metrics, writers=writers)
    return STORES[request.param]


@pytest.fixture
async def store(factory: StoreFactory, tmp_path: Path) -> AsyncIterator[MessageStore]:
    s = factory(tmp_path, Metrics())
    await s.start()
    yield s
    await s.close()


def msg(conv: str, n: int, sender: str = "cust", cmid: str | None = None) -> NewMessage:
    return NewMessage(
        conv=conv,
        sender=sender,
        sender_role=Role.CUSTOMER,
        client_msg_id=cmid if cmid is not None else f"{sender}-{n}",
        type="text",
        body=f'{{"text":"m{n}"}}'.encode(),
    )


async def test_seq_is_contiguous_under_concurrent_appends(store: MessageStore) -> None:
    convs = [(await store.create_conversation(customer_id=f"c{i}")).id for i in range(5)]
    futures = [store.submit(msg(conv, n)) for n in range(200) for conv in convs]
    results = await asyncio.gather(*futures)
    for conv in convs:
        seqs = [r.seq for r in results if r.conv == conv]
        # submission order is seq order, per conversation
        assert seqs == list(range(1, 201))
        assert await store.last_seq(conv) == 200
        stored = await store.messages_after(conv, 0, 1000)
        assert [m.seq for m in stored] == list(range(1, 201))
        assert [m.client_msg_id for m in stored] == [f"cust-{n}" for n in range(200)]


async def test_group_commit_batches_concurrent_appends(
    tmp_path: Path, factory: StoreFactory
) -> None:
    metrics = Metrics()
    store = factory(tmp_path, metrics)
    await store.start()
    try:
        conv = (await store.create_conversation(customer_id="c")).id
        await asyncio.gather(*(store.submit(msg(conv, n)) for n in range(500)))
    finally:
        await store.close()
    batches = metrics.registry.get_sample_value("kefu_store_batch_size_count") or 0
    jobs = metrics.registry.get_sample_value("kefu_store_batch_size_sum") or 0
    assert jobs == 501  # 500 appends + 1 create
    assert batches < 100, f"{batches} transactions for 500 concurrent appends: not batched"


async def test_a_busy_postgres_writer_waits_its_commit_delay_for_more_writes(
    postgres_url: str,
) -> None:
    metrics = Metrics()
    store = PostgresStore(postgres_url, metrics=metrics, commit_delay=0.6)
    await store.start()

    def batches() -> float:
        return metrics.registry.get_sample_value("kefu_store_batch_size_count") or 0

    try:
        conv = (await store.create_conversation(customer_id="c")).id
        loop = asyncio.get_running_loop()
        started = loop.time()
        await store.append(msg(conv, 0))  # idle (the last batch was one write): at once
        assert loop.time() - started < 0.6
        await asyncio.gather(store.submit(msg(conv, 1)), store.submit(msg(conv, 2)))
        before = batches()  # busy now: the next write waits for company
        first = store.submit(msg(conv, 3))
        await asyncio.sleep(0.05)
        second = store.submit(msg(conv, 4))
        assert [m.seq for m in await asyncio.gather(first, second)] == [4, 5]
        assert batches() == before + 1
    finally:
        await store.close()


async def test_postgres_writes_skip_a_conversation_another_transaction_holds(
    postgres_url: str,
) -> None:
    """Another node's transaction holds conversation A: writes to B commit at once, A's
    wait (re-queued, then waiting for the lock) and keep their order; nothing is lost."""
    metrics = Metrics()
    store = PostgresStore(postgres_url, metrics=metrics, commit_delay=0.0)
    await store.start()
    holder = await asyncpg.connect(postgres_url)
    try:
        a = (await store.create_conversation(customer_id="ca")).id
        b = (await store.create_conversation(customer_id="cb")).id
        await store.append(msg(a, 0))
        held = holder.transaction()
        await held.start()
        await holder.execute("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", a)
        for_a = [store.submit(msg(a, n)) for n in range(1, 4)]
        for_b = [store.submit(msg(b, n)) for n in range(1, 4)]
        assert [m.seq for m in await asyncio.wait_for(asyncio.gather(*for_b), 5)] == [1, 2, 3]
        assert not any(f.done() for f in for_a)
        await asyncio.sleep(0.3)  # the writes to A have gone to a batch that waits
        assert not any(f.done() for f in for_a)
        await held.commit()
        assert [m.seq for m in await asyncio.gather(*for_a)] == [2, 3, 4]
        assert metrics.registry.get_sample_value("kefu_store_requeued_total") >= 3
        stored = await store.messages_after(a, 0, 10)
        assert [m.client_msg_id for m in stored] == [f"cust-{n}" for n in range(4)]
    finally:
        await holder.close()
        await store.close()


async def test_schema_2s_kefu_append_still_stores(postgres_url: str) -> None:
    """Nodes of schema 2 call the 11-argument kefu_append during a rolling upgrade."""
    store = PostgresStore(postgres_url, metrics=Metrics())
    await store.start()
    conn = await asyncpg.connect(postgres_url)
    try:
        conv = (await store.create_conversation(customer_id="c")).id
        await store.append(msg(conv, 1))
        rows = await conn.fetch(
            "SELECT * FROM kefu_append($1::text[], $2::text[], $3::text[], $4::text[], "
            "$5::text[], $6::bytea[], $7::text[], $8::text[], $9::text[], $10::text[], $11)",
            [conv, conv, "nope"], ["cust"] * 3, ["customer"] * 3, ["cust-1", "x", "y"],
            ["text"] * 3, [b"{}"] * 3, ["all"] * 3, [None] * 3, [None] * 3,
            ["m1", "m2", "m3"], 5,
        )  # fmt: skip
        assert [(r["outcome"], r["seq"]) for r in rows] == [
            ("duplicate", 1),
            ("stored", 2),
            ("not_found", None),
        ]
        first = (await store.messages_after(conv, 0, 1))[0]
        columns = ("msg_id", "sender_role", "type", "body", "ts", "visibility")
        assert [rows[0][c] for c in columns] == [
            first.msg_id, "customer", "text", first.body, first.ts, "all"
        ]  # fmt: skip
        assert [rows[1][c] for c in columns] == ["m2", "customer", "text", b"{}", 5, "all"]
    finally:
        await conn.close()
        await store.close()


async def test_resend_is_idempotent_even_in_one_batch(store: MessageStore) -> None:
    conv = (await store.create_conversation(customer_id="c")).id
    first, again, other = await asyncio.gather(
        store.submit(msg(conv, 1, cmid="same")),
        store.submit(msg(conv, 1, cmid="same")),
        store.submit(msg(conv, 2, sender="agent", cmid="same")),  # other sender: not a dup
    )
    assert not first.duplicate and again.duplicate
    assert (again.seq, again.msg_id) == (first.seq, first.msg_id)
    assert not other.duplicate and other.seq == 2
    later = await store.append(msg(conv, 1, cmid="same"))
    assert later.duplicate and later.seq == first.seq
    assert len(await store.messages_after(conv, 0, 10)) == 2


async def test_unknown_conversation_fails_alone(store: MessageStore) -> None:
    conv = (await store.create_conversation(customer_id="c")).id
    good = store.submit(msg(conv, 1))
    bad = store.submit(msg("no-such-conversation", 1))
    good2 = store.submit(msg(conv, 2))
    assert (await good).seq == 1
    with pytest.raises(NotFound):
        await bad
    assert (await good2).seq == 2  # the batch was retried job by job: no seq was burnt
    assert [m.seq for m in await store.messages_after(conv, 0, 10)] == [1, 2]


async def test_paging_and_read_marks(store: MessageStore) -> None:
    conv = await store.create_conversation(customer_id="c", agent_id="a", group_id="g")
    assert conv.participants() == ("c", "a")
    for n in range(10):
        await store.append(msg(conv.id, n))
    assert [m.seq for m in await store.messages_after(conv.id, 3, 4)] == [4, 5, 6, 7]
    assert [m.seq for m in await store.messages_before(conv.id, None, 3)] == [8, 9, 10]
    assert [m.seq for m in await store.messages_before(conv.id, 4, 10)] == [1, 2, 3]
    assert await store.mark_read(conv.id, "a", 5) == 5
    assert await store.mark_read(conv.id, "a", 2) == 5  # never lowered
    listed = await store.list_conversations("a", limit=10)
    assert [(s.conversation.id, s.last_seq, s.read_seq) for s in listed] == [(conv.id, 10, 5)]
    assert await store.list_conversations("nobody", limit=10) == []
    assert (await store.get_conversation(conv.id)) == conv
    assert await store.get_conversation("missing") is None


async def test_committed_data_survives_reopen(tmp_path: Path, factory: StoreFactory) -> None:
    store = factory(tmp_path, Metrics())
    await store.start()
    conv = (await store.create_conversation(customer_id="c")).id
    acked = [await store.append(msg(conv, n)) for n in range(3)]
    await store.close()
    with pytest.raises(StoreClosed):
        store.submit(msg(conv, 9))

    reopened = factory(tmp_path, Metrics())
    await reopened.start()
    try:
        assert [m.msg_id for m in await reopened.messages_after(conv, 0, 10)] == [
            a.msg_id for a in acked
        ]
        # the seq counter continues from the database, not from zero
        assert (await reopened.append(msg(conv, 3))).seq == 4
    finally:
        await reopened.close()


async def test_sqlite_bounded_caches_stay_correct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With caches of 2 entries, seqs over 6 conversations still continue correctly."""
    import kefu.store.sqlite as sqlite_store
    import kefu.store.sqlite_writer as sqlite_writer

    monkeypatch.setattr(sqlite_store, "CACHE_SIZE", 2)
    monkeypatch.setattr(sqlite_writer, "SEQ_CACHE_SIZE", 2)
    store = SQLiteStore(tmp_path / "kefu.sqlite3", metrics=Metrics(), writer="thread")
    await store.start()
    try:
        convs = [(await store.create_conversation(customer_id=f"c{i}")).id for i in range(6)]
        for round_ in range(3):
            for conv in convs:
                assert (await store.append(msg(conv, round_))).seq == round_ + 1
        assert len(store._conversations) <= 2
        assert None not in [await store.get_conversation(c) for c in convs]
    finally:
        await store.close()


async def test_sqlite_refuses_writes_past_the_bound(tmp_path: Path) -> None:
    """Past max_pending queued writes the store pushes back instead of queueing forever."""
    from kefu.errors import ErrorCode, Overloaded

    metrics = Metrics()
    store = SQLiteStore(tmp_path / "kefu.sqlite3", metrics=metrics, max_pending=3)
    await store.start()
    try:
        conv = (await store.create_conversation(customer_id="c")).id
        futures = [store.submit(msg(conv, n)) for n in range(3)]
        with pytest.raises(Overloaded) as err:
            store.submit(msg(conv, 3))
        assert err.value.code is ErrorCode.OVERLOADED and err.value.retryable
        assert err.value.retry_after
        assert [r.seq for r in await asyncio.gather(*futures)] == [1, 2, 3]
        assert (await store.append(msg(conv, 3))).seq == 4  # room again once they commit
        assert metrics.registry.get_sample_value("kefu_store_overloaded_total") == 1
    finally:
        await store.close()


def test_sqlite_dedupe_query_uses_the_index(tmp_path: Path) -> None:
    """The idempotency lookup must be index searches, never a scan of all messages."""
    from kefu.store.sqlite_schema import SCHEMA, dedupe_sql

    with sqlite3.connect(tmp_path / "plan.sqlite3") as db:
        db.executescript(SCHEMA)
        plan = db.execute("EXPLAIN QUERY PLAN " + dedupe_sql(4), ["c", "s", "i"] * 4).fetchall()
    details = [row[3] for row in plan]
    assert any("SEARCH m USING INDEX messages_idempotency" in d for d in details), details
    assert not any(d.startswith("SCAN m") or d == "SCAN messages" for d in details), details


async def test_sqlite_writer_process_death_never_acks_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kill the writer process mid-stream: nothing unstored is acked, it comes back."""
    import kefu.store.sqlite as sqlite_store
    from kefu.errors import StoreError

    monkeypatch.setattr(sqlite_store, "RESTART_DELAY", 0.05)
    store = SQLiteStore(tmp_path / "kefu.sqlite3", metrics=Metrics())
    await store.start()
    try:
        conv = (await store.create_conversation(customer_id="c")).id
        acked = [await store.append(msg(conv, n)) for n in range(3)]
        runner = store._runner
        assert isinstance(runner, sqlite_store._ProcessRunner) and runner._proc is not None
        inflight = [store.submit(msg(conv, n)) for n in range(3, 50)]
        runner._proc.kill()
        outcomes = await asyncio.gather(*inflight, return_exceptions=True)
        acked += [o for o in outcomes if not isinstance(o, BaseException)]
        assert all(isinstance(o, StoreError) for o in outcomes if isinstance(o, BaseException))
        for _ in range(200):  # restarted by itself
            if runner.alive:
                break
            await asyncio.sleep(0.05)
        assert runner.alive
        assert await store.ping() is None
        # Resend everything with the same ids: stored once each, seqs 1..50, no gaps.
        for n in range(50):
            await store.append(msg(conv, n))
        stored = await store.messages_after(conv, 0, 100)
        assert [m.seq for m in stored] == list(range(1, 51))
        assert [m.client_msg_id for m in stored[:3]] == ["cust-0", "cust-1", "cust-2"]
        by_seq = {m.seq: m for m in stored}
        for ack in acked:  # every ack handed out before the kill is in the database
            assert by_seq[ack.seq].msg_id == ack.msg_id
    finally:
        await store.close()


async def test_sqlite_hung_writer_is_killed_and_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that stops answering (SIGSTOP here) is killed after STALL_SECONDS:
    its writes fail as 'outcome unknown', a new writer takes over, nothing is duplicated."""
    import os
    import signal

    import kefu.store.sqlite as sqlite_store
    from kefu.errors import StoreError

    monkeypatch.setattr(sqlite_store, "RESTART_DELAY", 0.05)
    monkeypatch.setattr(sqlite_store, "STALL_SECONDS", 0.3)
    monkeypatch.setattr(sqlite_store, "KILL_AFTER_SECONDS", 1.0)
    store = SQLiteStore(tmp_path / "kefu.sqlite3", metrics=Metrics())
    await store.start()
    try:
        conv = (await store.create_conversation(customer_id="c")).id
        runner = store._runner
        assert isinstance(runner, sqlite_store._ProcessRunner) and runner._proc is not None
        os.kill(runner._proc.pid, signal.SIGSTOP)
        stuck = store.submit(msg(conv, 0))
        await asyncio.sleep(0.5)
        with pytest.raises(StoreError):
            await store.ping()  # not ready while stalled
        with pytest.raises(StoreError):
            await asyncio.wait_for(stuck, 10)
        for _ in range(200):
            if runner.alive:
                break
            await asyncio.sleep(0.05)
        assert runner.alive
        # the resend is stored once, as seq 1
        assert (await store.append(msg(conv, 0))).seq == 1
        assert (await store.append(msg(conv, 0))).duplicate
    finally:
        await store.close()


async def test_postgres_append_checks_the_state_it_was_authorised_against(
    postgres_url: str,
) -> None:
    """Two nodes on one database: a send authorised on a hint another node made stale
    fails as StaleConversation, stores nothing and burns no seq; the others in its batch
    are stored."""
    here = PostgresStore(postgres_url, metrics=Metrics())
    there = PostgresStore(postgres_url, metrics=Metrics())
    await here.start()
    await there.start()
    try:
        conv = await here.create_conversation(customer_id="c", agent_id="a", group_id="g")
        hint = here.conversation_hint(conv.id)
        assert hint is not None and hint.agent_id == "a"
        other = await here.create_conversation(customer_id="d", agent_id="a", group_id="g")
        await there.transition(
            conv.id,
            from_states=[ConversationState.ASSIGNED],
            to_state=ConversationState.QUEUED,
            event_body=b'{"event":"requeued"}',
            sender="system",
            sender_role="system",
            sets={"agent_id": None},
        )
        assert here.conversation_hint(conv.id) == hint  # `here` has not heard of it

        def by_agent(conv_id: str, n: int) -> NewMessage:
            return dataclasses.replace(
                msg(conv_id, n, sender="a"),
                sender_role=Role.AGENT,
                expect=(ConversationState.ASSIGNED, "a"),
            )

        stale, fine = here.submit(by_agent(conv.id, 1)), here.submit(by_agent(other.id, 1))
        with pytest.raises(StaleConversation):
            await stale
        assert (await fine).seq == 1
        assert [m.sender for m in await here.messages_after(conv.id, 0, 10)] == ["system"]
        fresh = await here.get_conversation(conv.id, fresh=True)
        assert fresh is not None and here.conversation_hint(conv.id) == fresh
        customer = dataclasses.replace(msg(conv.id, 2), expect=(ConversationState.QUEUED, None))
        assert (await here.append(customer)).seq == 2  # the seq the stale one did not burn
        # Every write that returns the conversation refreshes the hint (else a send would
        # stamp the first response again and again).
        stamped = await here.stamp_response(other.id, "a")
        assert stamped is not None and stamped.first_response_at is not None
        assert here.conversation_hint(other.id) == stamped
    finally:
        await here.close()
        await there.close()
