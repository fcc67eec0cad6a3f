"""Failure handling in cluster mode, with real node processes and live traffic.

Every test runs Kefu nodes as processes (``python -m kefu serve``) on a Redis of its own
and PostgreSQL, with fast cluster timers (heartbeat 0.2 s, expiry 1 s), and four
customer/agent pairs of SDK clients chatting in their own conversations, the customer and
the agent of each pair on different nodes, each client reconnecting round-robin over the
node URLs (tests/traffic.py). Traffic runs before, during and after the fault; then a fresh
client reads every conversation from seq 0 and the test prints one line:

    [name] sent=.. acked=.. failed=.. stored=.. delivered=.. lost=0 duplicated=0 undelivered=0 ...

``lost``: acked but not in the history (or not as acked); ``duplicated``: a seq or msg_id
handed twice to the application after the SDK's dedupe; ``undelivered``: in the history
but never handed to a participant's application; the history must be seq 1..N per
conversation. The faults: SIGKILL a node, restart Redis (standalone and one Redis Cluster
master), stop PostgreSQL, drain a node with SIGTERM, add a node under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kefu.cluster import redis_client as rc
from kefu.cluster.ring import Ring
from tests.conftest import token
from tests.process import NodeProcess
from tests.services import PostgresServer, RedisClusterServers, RedisServer
from tests.traffic import Report, Traffic

pytestmark = pytest.mark.slow

HEARTBEAT = 0.2
TTL = 1.0
SETTINGS = (
    f"node_heartbeat={HEARTBEAT}",
    f"node_ttl={TTL}",
    "shutdown_grace=2",
    "rate_per_second=1000",
    "rate_burst=1000",
)
PAIRS = 4
RATE = 40.0  # messages per second, all clients together
BEFORE = 1.5  # seconds of traffic before the fault
AFTER = 2.0  # and after the recovery


# -- helpers ---------------------------------------------------------------------------------


def node_of(member: str) -> str:
    """The node id of a ``kefu:members`` entry (an incarnation ``node_id/random``)."""
    return member.rpartition("/")[0] or member


def make_nodes(
    tmp_path: Path, count: int, redis_url: str, database_url: str, log_level: str = "WARNING"
) -> list[NodeProcess]:
    return [
        NodeProcess(
            tmp_path / f"n{i}",
            None,
            *SETTINGS,
            f"redis_url={redis_url}",
            f"database_url={database_url}",
            node_id=f"n{i}",
            log_level=log_level,
        )
        for i in range(count)
    ]


async def metric(http: aiohttp.ClientSession, node: NodeProcess, name: str) -> float | None:
    async with http.get(f"{node.url}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def eventually(
    check: Callable[[], object], what: str, timeout: float = 10.0, step: float = 0.05
) -> float:
    """Wait until ``await check()`` is true; the seconds it took."""
    started = time.monotonic()
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not reached in {timeout}s: {what}")
        await asyncio.sleep(step)


async def ready_status(http: aiohttp.ClientSession, node: NodeProcess) -> int:
    try:
        async with http.get(f"{node.url}/ready") as resp:
            return resp.status
    except aiohttp.ClientError:
        return 0


async def cluster_formed(http: aiohttp.ClientSession, nodes: Sequence[NodeProcess]) -> float:
    """Wait until every node's ring holds all ``nodes``; the seconds it took."""

    async def formed() -> bool:
        seen = [await metric(http, n, "kefu_cluster_nodes") for n in nodes]
        return all(s == len(nodes) for s in seen)

    return await eventually(formed, f"every node sees {len(nodes)} nodes")


@contextlib.asynccontextmanager
async def running(
    nodes: Sequence[NodeProcess], count: int | None = None
) -> AsyncIterator[aiohttp.ClientSession]:
    """Start the first ``count`` (default: all) ``nodes`` together, wait for the ring to
    hold them all; stop every node after."""
    first = nodes[: len(nodes) if count is None else count]
    try:
        await asyncio.gather(*(n.start() for n in first))
        async with aiohttp.ClientSession() as http:
            await cluster_formed(http, first)
            yield http
    finally:
        for node in nodes:
            node.stop()


@contextlib.asynccontextmanager
async def traffic_on(
    urls: Sequence[str], homes: Sequence[tuple[int, int]]
) -> AsyncIterator[Traffic]:
    traffic = Traffic(urls, rate=RATE)
    try:
        for i, (customer_home, agent_home) in enumerate(homes):
            await traffic.add_pair(str(i), customer_home, agent_home)
        traffic.start()
        yield traffic
    finally:
        await traffic.close()


def spread(nodes: int, pairs: int = PAIRS) -> list[tuple[int, int]]:
    """Customer of pair i on node i % nodes, its agent on the next node."""
    return [(i % nodes, (i + 1) % nodes) for i in range(pairs)]


def check(report: Report) -> None:
    assert not report.gaps, report.gaps
    assert report.lost == 0, report.details
    assert report.duplicated == 0, report.details
    assert report.undelivered == 0, report.details
    assert report.acked > 0 and report.stored >= report.acked


async def presence_of(url: str, users: Sequence[str]) -> dict[str, list[str]]:
    client, _ = await rc.connect(url)
    try:
        return {u: [rc.text(v) for v in await client.hvals(rc.presence(u))] for u in users}
    finally:
        await client.aclose()


async def members_of(url: str) -> list[str]:
    client, _ = await rc.connect(url)
    try:
        members = await client.zrange(rc.MEMBERS, 0, -1)
        return [rc.text(m) for m in members if isinstance(m, bytes | str)]
    finally:
        await client.aclose()


# -- (a) SIGKILL a node -----------------------------------------------------------------------


async def test_sigkill_a_node_clients_move_and_nothing_acked_is_lost(
    tmp_path: Path, private_redis: RedisServer, postgres_url: str
) -> None:
    """SIGKILL n0 mid-traffic: its incarnation's presence entries and membership are
    purged once it expires (node_ttl), its clients reconnect to n1/n2 and resync, and every
    acked message is in the history, delivered once to each participant."""
    nodes = make_nodes(tmp_path, 3, private_redis.url, postgres_url)
    started = time.monotonic()
    async with running(nodes), traffic_on([n.url for n in nodes], spread(3)) as traffic:
        await asyncio.sleep(BEFORE)
        victim = nodes[0]
        incarnation = next(m for m in await members_of(private_redis.url) if node_of(m) == "n0")
        on_victim = [c for c in traffic.clients if c.node == "n0"]
        users = [c.user_id for c in traffic.clients]
        assert on_victim and any(
            incarnation in holders
            for holders in (await presence_of(private_redis.url, users)).values()
        )
        victim.kill()

        async def purged() -> bool:
            holders = await presence_of(private_redis.url, users)
            stale = any(incarnation in h for h in holders.values())
            return not stale and incarnation not in await members_of(private_redis.url)

        purge_s = await eventually(purged, "the dead node's presence purged", step=0.02)
        moved_s = await eventually(
            lambda: all(c.connected and c.node != "n0" for c in on_victim),
            "the dead node's clients reconnected elsewhere",
        )
        await asyncio.sleep(AFTER)
        await traffic.stop()
        report = await traffic.verify(nodes[1].url)
    print(
        report.line(
            "sigkill",
            purge_s=f"{purge_s:.2f}",
            moved_s=f"{moved_s:.2f}",
            moved=len(on_victim),
            reconnects=sum(c.reconnects for c in traffic.clients),
            errors=dict(traffic.errors()),
            elapsed_s=f"{time.monotonic() - started:.1f}",
        )
    )
    # Expired after node_ttl without a heartbeat; purged by the next beat of its owner.
    assert purge_s <= TTL + 2 * HEARTBEAT + 1.0, purge_s
    assert all(c.reconnects >= 1 for c in on_victim)
    check(report)


# -- (b) restart Redis ------------------------------------------------------------------------

OUTAGE = 1.5
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def warning_times(node: NodeProcess, text: str) -> list[float]:
    """Wall-clock times of the node's log lines containing ``text``."""
    out = []
    for line in node.log.read_text(errors="replace").splitlines():
        match = LOG_TIME.match(line)
        if match and text in line:
            stamp = time.strptime(match.group(1)[:19], "%Y-%m-%d %H:%M:%S")
            out.append(time.mktime(stamp) + int(match.group(1)[20:]) / 1000)
    return out


async def probe_until(traffic: Traffic, timeout: float) -> tuple[list[str], float]:
    """Probe until every pair's pushes go through both ways (or ``timeout``)."""
    started = time.monotonic()
    while True:
        failures = await traffic.probe(timeout=2.0)
        if not failures or time.monotonic() - started > timeout:
            return failures, time.monotonic() - started


class DeliveryNotRecovered(AssertionError):
    """Cross-node pushes did not come back by themselves after Redis did."""


@pytest.mark.parametrize(
    "kind",
    [
        "redis",
        "redis-cluster",
    ],
)
async def test_redis_restart_no_false_ack_and_delivery_recovers_by_itself(
    tmp_path: Path, request: pytest.FixtureRequest, postgres_url: str, kind: str
) -> None:
    """Redis goes away for 1.5 s (standalone: restarted empty; Redis Cluster: the master
    holding n1's channel). Sends only need PostgreSQL, so they keep being acked, and every
    ack is stored; the nodes resubscribe with jittered backoff, rewrite their presence and
    tell their clients to resync; cross-node pushes then flow again by themselves."""
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("private_redis")
        url = server.url

        def down() -> None:
            server.stop()  # its data is gone: members and presence must be written again

        def up() -> None:
            server.start()

    else:
        cluster: RedisClusterServers = request.getfixturevalue("private_redis_cluster")
        url = cluster.url

        master = cluster.node_for_key(rc.node_channel("n1"))  # and a third of the slots

        def down() -> None:
            cluster.stop(master)

        def up() -> None:
            cluster.nodes[master].start()
            cluster.wait_ok()

    nodes = make_nodes(tmp_path, 3, url, postgres_url)
    started = time.monotonic()
    async with running(nodes) as http, traffic_on([n.url for n in nodes], spread(3)) as traffic:
        await asyncio.sleep(BEFORE)
        await asyncio.to_thread(down)
        t_down = time.monotonic()
        await asyncio.sleep(OUTAGE)
        t_up = time.monotonic()
        await asyncio.to_thread(up)
        t_back = time.monotonic()

        up_now: list[float | None] = []

        async def subscribed() -> bool:
            up_now[:] = [await metric(http, n, "kefu_cluster_redis_up") for n in nodes]
            return all(v == 1 for v in up_now)

        try:
            await eventually(subscribed, "every node subscribed again")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: kefu_cluster_redis_up of n0..n2 = {up_now}") from None
        failures, _ = await probe_until(traffic, timeout=3.0)
        recovered_s = time.monotonic() - t_back  # Redis back -> pushes through both ways
        await asyncio.sleep(AFTER)
        await traffic.stop()
        report = await traffic.verify(nodes[1].url)
    during = sum(1 for c in traffic.clients for t, _ in c.ack_log if t_down <= t <= t_up)
    resynced = sum(1 for c in traffic.clients if any(code == "resync" for _, code in c.notices))
    retries = [
        [round(b - a, 2) for a, b in itertools.pairwise(warning_times(n, "subscription lost"))]
        for n in nodes
    ]
    print(
        report.line(
            f"redis-restart/{kind}",
            acked_during_outage=during,
            restart_s=f"{t_back - t_down:.2f}",
            pushes_back_s=f"{recovered_s:.2f}",
            resync_notices=resynced,
            resubscribe_intervals=retries,
            errors=dict(traffic.errors()),
            elapsed_s=f"{time.monotonic() - started:.1f}",
        )
    )
    # A send needs PostgreSQL only: sends went on being acked, and every ack is stored.
    assert during > 0
    assert not report.gaps, report.gaps
    assert report.lost == 0, report.details
    assert report.duplicated == 0, report.details
    if kind == "redis":
        assert resynced == len(traffic.clients)  # every node's subscription broke
        # Each node retried, backing off (with jitter: the intervals differ between nodes).
        assert all(len(r) >= 2 and r[-1] > r[0] for r in retries), retries
    # The service recovers by itself: pushes flow again and everyone ends up with all.
    if failures or report.undelivered:
        raise DeliveryNotRecovered(f"{failures} {report.details}")


# -- (c) stop PostgreSQL ----------------------------------------------------------------------

PG_OUTAGE = 2.0


async def test_postgres_outage_sends_fail_retryably_and_recovery_is_automatic(
    tmp_path: Path, private_redis: RedisServer, private_postgres: PostgresServer
) -> None:
    """PostgreSQL stops for 2 s: /ready says 503, sends get retryable errors
    (store_unavailable) and nothing is acked while it is down; the SDK resends under the
    same client_msg_id, and once it is back every send is acked exactly once."""
    nodes = make_nodes(tmp_path, 3, private_redis.url, private_postgres.url)
    started = time.monotonic()
    async with running(nodes) as http, traffic_on([n.url for n in nodes], spread(3)) as traffic:
        await asyncio.sleep(BEFORE)
        await asyncio.to_thread(private_postgres.stop)
        t_down = time.monotonic()

        async def unready() -> bool:
            return all([await ready_status(http, n) == 503 for n in nodes])

        unready_s = await eventually(unready, "every node reports the store unavailable")
        await asyncio.sleep(max(0.0, PG_OUTAGE - (time.monotonic() - t_down)))
        t_up = time.monotonic()
        await asyncio.to_thread(private_postgres.start)

        async def ready() -> bool:
            return all([await ready_status(http, n) == 200 for n in nodes])

        ready_s = await eventually(ready, "every node ready again")
        await asyncio.sleep(AFTER)
        await traffic.stop()
        report = await traffic.verify(nodes[0].url)
    errors = [e for c in traffic.clients for e in c.errors]
    # Acks that arrived while PostgreSQL was down (a margin for those already on the wire).
    false_acks = [
        (c.user_id, a.seq)
        for c in traffic.clients
        for t, a in c.ack_log
        if t_down + 0.5 <= t <= t_up
    ]
    print(
        report.line(
            "postgres-stop",
            outage_s=f"{t_up - t_down:.2f}",
            unready_s=f"{unready_s:.2f}",
            ready_again_s=f"{ready_s:.2f}",
            errors=dict(traffic.errors()),
            acks_during_outage=len(false_acks),
            elapsed_s=f"{time.monotonic() - started:.1f}",
        )
    )
    assert any(code == "store_unavailable" for _, op, code, _r in errors if op == "send")
    assert all(retryable for *_, retryable in errors), errors
    assert not false_acks, false_acks
    # The SDK resent under the same client_msg_id until stored: every send got its ack.
    assert report.failed == 0 and report.acked == report.sent
    check(report)


# -- (d) drain a node with SIGTERM ------------------------------------------------------------


async def test_sigterm_drain_moves_clients_with_1012_and_loses_nothing(
    tmp_path: Path, private_redis: RedisServer, postgres_url: str
) -> None:
    """SIGTERM n0: it drains (acks flushed, `draining` notice, close 1012), removes its own
    presence and membership before it exits, and its clients land on n1/n2 without loss."""
    nodes = make_nodes(tmp_path, 3, private_redis.url, postgres_url)
    started = time.monotonic()
    async with running(nodes), traffic_on([n.url for n in nodes], spread(3)) as traffic:
        await asyncio.sleep(BEFORE)
        victim = nodes[0]
        incarnation = next(m for m in await members_of(private_redis.url) if node_of(m) == "n0")
        on_victim = [c for c in traffic.clients if c.node == "n0"]
        users = [c.user_id for c in traffic.clients]
        t_term = time.monotonic()
        status = await asyncio.to_thread(victim.terminate)
        drain_s = time.monotonic() - t_term
        assert status == 0
        # A graceful stop removes its own presence entries and membership at once.
        holders = await presence_of(private_redis.url, users)
        assert not any(incarnation in h for h in holders.values()), holders
        assert incarnation not in await members_of(private_redis.url)
        moved_s = await eventually(
            lambda: all(c.connected and c.node != "n0" for c in on_victim),
            "the drained node's clients reconnected elsewhere",
        )
        await asyncio.sleep(AFTER)
        await traffic.stop()
        codes = [c.close_codes[0] for c in on_victim]
        others = [code for c in traffic.clients if c not in on_victim for code in c.close_codes]
        report = await traffic.verify(nodes[1].url)
    notified = sum(1 for c in on_victim if any(n == "draining" for _, n in c.notices))
    print(
        report.line(
            "sigterm-drain",
            drain_s=f"{drain_s:.2f}",
            moved_s=f"{moved_s:.2f}",
            close_codes=codes,
            draining_notices=notified,
            errors=dict(traffic.errors()),
            elapsed_s=f"{time.monotonic() - started:.1f}",
        )
    )
    # 1012: reconnect elsewhere. A client still sending while the node closes may see its
    # close frame destroyed by a TCP reset (1006, also "reconnect"; docs/operations.md).
    assert all(code in (1012, 1006) for code in codes), codes
    assert 1012 in codes, codes
    assert not others, others  # nobody else was disconnected
    assert all(c.reconnects == 1 for c in on_victim)
    assert all(retryable for c in traffic.clients for *_, retryable in c.errors)
    check(report)


# -- (e) add a node under load ----------------------------------------------------------------

RING_LINE = re.compile(r"cluster: ring (\w+) -> (\w+): (.*)$")


def ring_versions(node: NodeProcess) -> list[tuple[str, str]]:
    """(version, nodes) of every ring the node switched to, from its INFO log."""
    out = []
    for line in node.log.read_text(errors="replace").splitlines():
        match = RING_LINE.search(line)
        if match:
            out.append((match.group(2), match.group(3)))
    return out


async def cluster_api(http: aiohttp.ClientSession, node: NodeProcess) -> dict[str, Any] | None:
    """``GET /api/v1/cluster`` (admin) of ``node``; None when the node has no such route."""
    headers = {"Authorization": f"Bearer {token('ops', 'admin')}"}
    async with http.get(f"{node.url}/api/v1/cluster", headers=headers) as resp:
        if resp.status == 404:
            return None
        assert resp.status == 200, await resp.text()
        info: dict[str, Any] = await resp.json()
        return info


async def test_add_a_node_under_load_rebalances_and_loses_nothing(
    tmp_path: Path, private_redis: RedisServer, postgres_url: str
) -> None:
    """n2 joins a two-node cluster under load: every node switches to the same new ring
    (the one of kefu:members; GET /api/v1/cluster where the node has it, else its log),
    a new pair chats through n2 at once, and nothing is lost."""
    nodes = make_nodes(tmp_path, 3, private_redis.url, postgres_url, log_level="INFO")
    urls = [n.url for n in nodes]
    started = time.monotonic()
    async with running(nodes, 2) as http, traffic_on(urls, spread(2)) as traffic:
        await asyncio.sleep(BEFORE)
        old = {n.node_id: ring_versions(n)[-1][0] for n in nodes[:2]}
        t_join = time.monotonic()
        await nodes[2].start()
        joined_s = time.monotonic() - t_join
        formed_s = await cluster_formed(http, nodes)
        # The new node takes live traffic at once: a pair with its customer there.
        pair = await traffic.add_pair("new", 2, 0)
        traffic.start([pair])
        await asyncio.sleep(AFTER)
        members = await members_of(private_redis.url)
        api = {n.node_id: await cluster_api(http, n) for n in nodes}
        await traffic.stop()
        report = await traffic.verify(nodes[2].url)
    # The ring of the live members in kefu:members, as every node must have built it.
    expected = Ring(dict.fromkeys((node_of(m) for m in members), 1.0))
    logged = {n.node_id: ring_versions(n)[-1][0] for n in nodes}
    source = "api" if all(api.values()) else "log"
    print(
        report.line(
            "add-node",
            join_s=f"{joined_s:.2f}",
            ring_agreed_s=f"{formed_s:.2f}",
            ring=f"{next(iter(old.values()))}->{expected.version}",
            ring_source=source,
            nodes=",".join(expected.nodes),
            errors=dict(traffic.errors()),
            elapsed_s=f"{time.monotonic() - started:.1f}",
        )
    )
    assert expected.nodes == ("n0", "n1", "n2")
    assert len(set(old.values())) == 1 and expected.version not in old.values()
    # Every node, the new one included, switched to the same ring: the one of all three.
    assert set(logged.values()) == {expected.version}, logged
    if source == "api":  # GET /api/v1/cluster (admin), where the node has it
        versions = {node: info["ring_version"] for node, info in api.items() if info}
        assert set(versions.values()) == {expected.version}, versions
        for info in api.values():
            assert info is not None and [n["id"] for n in info["nodes"]] == ["n0", "n1", "n2"]
    assert all(c.reconnects == 0 for c in traffic.clients)
    check(report)


# -- bugs found by these tests, pinned down -------------------------------------------------


class NotSynced(AssertionError):
    """The application never got messages stored while its client stayed connected."""


async def pushed_warm_up(traffic: Traffic) -> None:
    """One message each way per pair, each pushed to the peer: delivery works."""
    failures = await traffic.probe(timeout=5.0)
    assert not failures, failures


async def test_sdk_syncs_on_the_resync_notice_after_a_redis_outage(
    tmp_path: Path, private_redis: RedisServer, postgres_url: str
) -> None:
    """Pushes lost in a Redis outage: the node sends `resync`, so the client must sync
    even when no later message in the conversation reveals the gap.

    (At commit b8a3721 the SDK only queued the notice in ``Client.events`` and never
    synced; the working tree's ``Client._dispatch`` now resumes on ``resync``.)"""
    nodes = make_nodes(tmp_path, 2, private_redis.url, postgres_url)
    async with running(nodes):
        traffic = Traffic([n.url for n in nodes])
        try:
            pair = await traffic.add_pair("r", 0, 1)
            await pushed_warm_up(traffic)
            await asyncio.to_thread(private_redis.stop)
            # Stored and acked (PostgreSQL is up); the push to the customer's node is lost.
            acks = [await traffic.send(pair.agent, pair.conv, f"agent-r-away-{i}") for i in (1, 2)]
            assert all(acks)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(private_redis.start)
            customer = pair.customer
            await eventually(
                lambda: any(code == "resync" for _, code in customer.notices),
                "the customer's node tells it to resync",
            )
            last = max(a.seq for a in acks if a is not None)
            with contextlib.suppress(AssertionError):
                await eventually(lambda: customer.last_seq.get(pair.conv, 0) >= last, "", 3.0)
            got = customer.last_seq.get(pair.conv, 0)
            if got < last:
                raise NotSynced(f"3 s after the resync notice the app has seq {got} of {last}")
        finally:
            await traffic.close()


async def test_redis_cluster_master_restart_keeps_users_reachable(
    tmp_path: Path, private_redis_cluster: RedisClusterServers, postgres_url: str
) -> None:
    """A Redis Cluster master that holds a user's presence (but no node's channel)
    restarts empty: that user must still get cross-node pushes afterwards."""
    cluster = private_redis_cluster
    nodes = make_nodes(tmp_path, 2, cluster.url, postgres_url)
    channels = {cluster.node_for_key(rc.node_channel(n.node_id)) for n in nodes}
    # A customer whose presence hash lives on a master that holds neither node's channel.
    name = next(
        str(i) for i in range(100) if cluster.node_for_key(rc.presence(f"cust-{i}")) not in channels
    )
    master = cluster.node_for_key(rc.presence(f"cust-{name}"))
    async with running(nodes):
        traffic = Traffic([n.url for n in nodes])
        try:
            pair = await traffic.add_pair(name, 0, 1)
            await pushed_warm_up(traffic)
            await asyncio.to_thread(cluster.restart, master)  # back, empty, cluster_state:ok
            await asyncio.sleep(1.0)  # several heartbeats: the nodes had every chance
            failures, _ = await probe_until(traffic, timeout=3.0)
            holders = await presence_of(cluster.url, [pair.customer.user_id])
            if failures:
                raise DeliveryNotRecovered(f"{failures}; presence now {holders}")
        finally:
            await traffic.close()
