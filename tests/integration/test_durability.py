"""Ack means durable: SIGKILL the node mid-traffic, restart it, every acked message is there.

Also the graceful path: SIGTERM drains (acks flushed, clients closed with 1012).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kefu.client import Backoff, Client
from kefu.protocol import frames as f
from tests.conftest import token
from tests.process import NodeProcess

pytestmark = pytest.mark.slow

PAIRS = 4


@contextlib.asynccontextmanager
async def node(tmp_path: Path) -> AsyncIterator[NodeProcess]:
    proc = NodeProcess(tmp_path / "data", None, "rate_per_second=1000", "rate_burst=1000")
    await proc.start()
    try:
        yield proc
    finally:
        proc.stop()


async def sender(
    client: Client, conv: str, acks: list[f.Ack], stop: asyncio.Event, lanes: int = 4
) -> None:
    """Keep ``lanes`` sends in flight at once, so the kill lands mid-batch."""

    async def lane(n: int) -> None:
        i = 0
        while not stop.is_set():
            cmid = f"{client.user_id}-{n}-{i}"
            try:
                acks.append(await client.send(conv, f"msg {cmid}", client_msg_id=cmid))
            except Exception:  # the node died under this send: it was never acked
                return
            i += 1

    await asyncio.gather(*(lane(n) for n in range(lanes)))


async def all_messages(client: Client, conv: str) -> list[f.Message]:
    out: list[f.Message] = []
    after = 0
    while True:
        page = await client._retrying(f.Sync(conv=conv, after_seq=after, limit=200), 5)
        assert isinstance(page, f.Messages)
        out.extend(page.messages)
        if not page.has_more:
            return out
        after = page.messages[-1].seq


def check(acks: list[f.Ack], stored: dict[str, list[f.Message]]) -> None:
    for conv, messages in stored.items():
        seqs = [m.seq for m in messages]
        assert seqs == list(range(1, len(seqs) + 1)), f"{conv}: seqs not 1..n without gaps"
        ids = [(m.sender, m.client_msg_id) for m in messages]
        assert len(ids) == len(set(ids)), f"{conv}: a client_msg_id stored twice"
    by_key = {(m.conv, m.seq): m for ms in stored.values() for m in ms}
    for ack in acks:
        message = by_key.get((ack.conv, ack.seq))
        assert message is not None, f"acked message {ack.conv}/{ack.seq} lost"
        assert message.client_msg_id == ack.client_msg_id and message.msg_id == ack.msg_id


async def run_traffic(proc: NodeProcess, stop_node: str) -> None:
    agents = [
        Client(proc.url, f"agent-{i}", token(f"agent-{i}", "agent"), reconnect=False)
        for i in range(PAIRS)
    ]
    customers = [
        Client(proc.url, f"cust-{i}", token(f"cust-{i}"), reconnect=False) for i in range(PAIRS)
    ]
    clients = agents + customers
    acks: list[f.Ack] = []
    stop = asyncio.Event()
    try:
        for c in clients:
            await c.connect()
        convs = [(await a.open(customer_id=f"cust-{i}")).conv for i, a in enumerate(agents)]
        tasks = [
            asyncio.ensure_future(sender(c, conv, acks, stop))
            for c, conv in zip(customers, convs, strict=True)
        ]
        tasks += [
            asyncio.ensure_future(sender(a, conv, acks, stop))
            for a, conv in zip(agents, convs, strict=True)
        ]
        while len(acks) < 400:
            await asyncio.sleep(0.01)
        if stop_node == "kill":
            proc.kill()
        else:
            assert proc.terminate() == 0
            for _ in range(100):  # the clients see the close frames a moment later
                if all(c.close_codes for c in clients):
                    break
                await asyncio.sleep(0.05)
            codes = [code for c in clients for code in c.close_codes]
            print(f"close codes after SIGTERM: {codes}")
            # The drain closes every client with 1012 (the SDK reports the code of the close
            # frame itself, even when aiohttp closed TCP before the client could reply).
            # Known race (docs/operations.md): a client still sending while the node closes
            # may get a TCP reset that destroys the close frame; it then sees 1006, which
            # also means "reconnect". Every client must be told to reconnect, most by 1012.
            assert all(code in (1012, 1006) for code in codes), codes
            assert 1012 in codes, codes
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        for c in clients:
            await c.close()
    print(f"{len(acks)} messages acked before the node stopped ({stop_node})")

    await proc.start()
    reader = Client(proc.url, "admin", token("admin", "admin"), backoff=Backoff(0.05, 0.5))
    async with reader:
        stored = {conv: await all_messages(reader, conv) for conv in convs}
    check(acks, stored)
    assert sum(len(v) for v in stored.values()) >= len(acks)


async def test_sigkill_loses_no_acknowledged_message(tmp_path: Path) -> None:
    async with node(tmp_path) as proc:
        await run_traffic(proc, "kill")


async def test_sigterm_drains_gracefully(tmp_path: Path) -> None:
    async with node(tmp_path) as proc:
        await run_traffic(proc, "term")
