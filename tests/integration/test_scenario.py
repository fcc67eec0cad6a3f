"""A simulated busy hour of the help desk over real sockets, then its invariants.

200 customers and 20 agents in 3 skill groups: random arrivals, chats, private notes,
transfers to groups and agents, customers dropping and coming back, two agents vanishing
past the offline grace period, resolutions and ratings. Every client is a
:class:`kefu.client.Client` (exactly-once delivery after dedupe). Afterwards:

1. no agent was ever over capacity (checked after every routing step);
2. a conversation never had two agents at once, and every queued conversation was assigned
   exactly once per stay in the queue (replayed from the routing steps and from history);
3. FIFO order held in every group's queue (a model queue replays every enqueue, requeue at
   the head, removal and assignment);
4. every message reached every participant exactly once after client dedupe (customers
   see every public seq once; the agent holding a conversation sees every seq once);
5. no private note ever reached a customer (pushes, sync, REST history, search);
6. the REST reports agree with what happened (counted from the events and the ratings).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from kefu.client import Client
from kefu.errors import ClientError
from kefu.model import Agent, Group
from kefu.protocol import frames as f
from kefu.routing.base import QueueEntry
from kefu.routing.memory import MemoryRouting
from kefu.server import Server
from kefu.views import message_frame
from tests.conftest import make_config, token

pytestmark = pytest.mark.slow

GROUPS = ("presale", "billing", "logistics")
AGENTS = 20
CUSTOMERS = 200
TURNS = 3  # customer messages before the agent resolves
SEED = 20261128


class Audit:
    """Wraps the routing backend: checks capacity and single ownership after every step,
    and replays the queues in a model to check FIFO order."""

    def __init__(self, routing: MemoryRouting) -> None:
        self.routing = routing
        self.violations: list[str] = []
        self.model: dict[str, dict[bool, collections.deque[str]]] = {}
        self.assignments: collections.Counter[str] = collections.Counter()
        self.stays: collections.Counter[str] = collections.Counter()
        self._wrap()

    def _queues(self, group: str) -> dict[bool, collections.deque[str]]:
        return self.model.setdefault(group, {False: collections.deque(), True: collections.deque()})

    def _drop(self, conv: str) -> None:
        for queues in self.model.values():
            for queue in queues.values():
                if conv in queue:
                    queue.remove(conv)

    def check(self, where: str) -> None:
        holders: dict[str, str] = {}
        for state in self.routing._agents.values():
            if state.load > state.capacity:
                self.violations.append(f"{where}: {state.id} holds {state.load} > {state.capacity}")
            for conv in state.active:
                if conv in holders:
                    self.violations.append(
                        f"{where}: {conv} held by {holders[conv]} and {state.id}"
                    )
                holders[conv] = state.id

    def _wrap(self) -> None:
        r = self.routing
        enqueue, dequeue, assign_next = r.enqueue, r.dequeue, r.assign_next
        pick, reserve, release, move = r.pick, r.reserve, r.release, r.move
        move_to_backlog = r.move_to_backlog

        async def enqueue_(entry: QueueEntry, *, head: bool = False) -> None:
            await enqueue(entry, head=head)
            self._drop(entry.conv)
            queue = self._queues(entry.group)[entry.backlog]
            queue.appendleft(entry.conv) if head else queue.append(entry.conv)
            self.stays[entry.conv] += 1
            self.check("enqueue")

        async def dequeue_(conv: str) -> QueueEntry | None:
            entry = await dequeue(conv)
            self._drop(conv)
            return entry

        async def assign_next_(group: str, now: int) -> Any:
            a = await assign_next(group, now)
            if a is not None:
                queues = self._queues(group)
                expected = (queues[False] or queues[True] or [None])[0]
                if a.conv != expected:
                    self.violations.append(f"FIFO: {group} gave {a.conv}, head was {expected}")
                self._drop(a.conv)
                self.assignments[a.conv] += 1
            self.check("assign_next")
            return a

        async def pick_(agent_id: str, conv: str, now: int) -> Any:
            a = await pick(agent_id, conv, now)
            self._drop(conv)
            self.assignments[conv] += 1
            self.check("pick")
            return a

        async def reserve_(agent_id: str, conv: str, now: int, *, force: bool = False) -> bool:
            ok = await reserve(agent_id, conv, now, force=force)
            if ok:
                self._drop(conv)
            self.check("reserve")
            return ok

        async def move_(
            conv: str, from_agent: str | None, to_agent: str, now: int, *, force: bool = False
        ) -> bool:
            ok = await move(conv, from_agent, to_agent, now, force=force)
            if ok:
                self._drop(conv)
            self.check("move")
            return ok

        async def release_(agent_id: str, conv: str, now: int) -> None:
            await release(agent_id, conv, now)
            self.check("release")

        async def move_to_backlog_(group: str, older_than: int) -> list[QueueEntry]:
            moved = await move_to_backlog(group, older_than)
            for entry in moved:
                self._drop(entry.conv)
                self._queues(group)[True].append(entry.conv)
            return moved

        r.enqueue = enqueue_  # type: ignore[method-assign]
        r.dequeue = dequeue_  # type: ignore[method-assign]
        r.assign_next = assign_next_  # type: ignore[method-assign]
        r.pick = pick_  # type: ignore[method-assign]
        r.reserve = reserve_  # type: ignore[method-assign]
        r.release = release_  # type: ignore[method-assign]
        r.move = move_  # type: ignore[method-assign]
        r.move_to_backlog = move_to_backlog_  # type: ignore[method-assign]


def event_of(message: f.Message) -> tuple[str, dict[str, Any]] | None:
    if message.type != "system":
        return None
    body = msgspec.json.decode(message.body)
    return body["event"], body.get("data", {})


class Desk:
    """What the simulation did, as the clients saw it."""

    def __init__(self) -> None:
        self.ratings: dict[str, int] = {}
        self.customer_seen: dict[str, list[f.Message]] = {}  # by customer
        self.conv_of: dict[str, str] = {}  # customer -> their conversation
        self.notes_sent: set[str] = set()
        self.finished: set[str] = set()
        self.refusals: list[tuple[str, str, str, str]] = []


async def run_customer(
    url: str, user: str, group: str, rng: random.Random, desk: Desk, http: aiohttp.ClientSession
) -> None:
    tok = token(user, "customer")
    client = Client(url, user, tok, session=http, heartbeat=None)
    await client.connect()
    seen: list[f.Message] = []
    try:
        info = await client.open(group=group)
        conv = info.conv
        desk.conv_of[user] = conv
        sent = 0
        await client.send(conv, f"hello from {user}")
        sent += 1
        drop = rng.random() < 0.2
        while True:
            message = await client.next_message(timeout=20)
            seen.append(message)
            if message.conv != conv:
                continue
            event = event_of(message)
            if event is not None and event[0] == "resolved":
                if rng.random() < 0.6:
                    score = rng.randint(1, 5)
                    await client.request(f.Rate(conv=conv, score=score, comment="ok"))
                    desk.ratings[conv] = score
                break
            if message.sender_role == "agent" and message.type == "text" and sent < TURNS:
                if drop and sent == 1:  # the network drops; the customer comes back
                    await client.close()
                    await asyncio.sleep(rng.uniform(0.05, 0.3))
                    client = Client(url, user, tok, session=http, heartbeat=None)
                    await client.connect()
                    seen = []  # a new client delivers the whole history again
                    await client.sync(conv)
                    drop = False
                    continue
                await asyncio.sleep(rng.uniform(0.0, 0.05))
                await client.send(conv, f"message {sent} from {user}")
                sent += 1
        await client.sync(conv)
        while not client._inbox.empty():
            seen.append(client._inbox.get_nowait())  # type: ignore[arg-type]
        desk.finished.add(user)
    finally:
        desk.customer_seen[user] = seen
        await client.close()


class AgentBot:
    def __init__(
        self,
        url: str,
        user: str,
        groups: tuple[str, ...],
        rng: random.Random,
        desk: Desk,
        http: aiohttp.ClientSession,
        all_agents: list[str],
    ) -> None:
        self.url, self.user, self.groups, self.rng, self.desk = url, user, groups, rng, desk
        self.http = http
        self.all_agents = all_agents
        self.client: Client | None = None
        self.task: asyncio.Task[None] | None = None
        self.seen: dict[str, list[f.Message]] = collections.defaultdict(list)
        self.customer_turns: collections.Counter[str] = collections.Counter()
        self.transferred: set[str] = set()

    async def start(self) -> None:
        self.seen.clear()
        self.customer_turns.clear()
        self.client = Client(
            self.url, self.user, token(self.user, "agent"), session=self.http, heartbeat=None
        )
        await self.client.connect()
        await self.client.request(f.SetStatus(status="online"))
        self.task = asyncio.get_running_loop().create_task(self.loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.client is not None:
            await self.client.close()

    async def act(self, frame: Any) -> None:
        assert self.client is not None
        try:
            await self.client.request(frame)
        except ClientError as exc:  # transferred away meanwhile, agent unavailable...
            self.desk.refusals.append(
                (self.user, type(frame).__name__, getattr(frame, "conv", ""), str(exc))
            )

    async def loop(self) -> None:
        assert self.client is not None
        while True:
            try:
                message = await self.client.next_message()
            except ClientError:
                return  # closed
            self.seen[message.conv].append(message)
            event = event_of(message)
            if event is not None:
                name, data = event
                mine = data.get("agent") == self.user or data.get("to") == self.user
                if name in ("assigned", "transferred", "reopened_to_agent") and mine:
                    if self.customer_turns[message.conv] >= TURNS:
                        await self.act(f.Resolve(conv=message.conv))  # nothing left to do
                        continue
                    await self.act(
                        f.Send(
                            conv=message.conv,
                            client_msg_id=f"hi-{message.seq}",
                            type="text",
                            body=msgspec.Raw(b'{"text":"hello, I am here"}'),
                        )
                    )
                continue
            if message.sender_role != "customer":
                continue
            self.customer_turns[message.conv] += 1
            conv = message.conv
            info = self.rng.random()
            if self.customer_turns[conv] >= TURNS:
                await self.act(f.Resolve(conv=conv))
            elif info < 0.1 and conv not in self.transferred:
                self.transferred.add(conv)
                other = self.rng.choice([g for g in GROUPS])
                await self.act(f.Transfer(conv=conv, group=other, note=f"note by {self.user}"))
                self.desk.notes_sent.add(f"note by {self.user}")
            elif info < 0.15 and conv not in self.transferred:
                self.transferred.add(conv)
                target = self.rng.choice([a for a in self.all_agents if a != self.user])
                await self.act(f.Transfer(conv=conv, agent=target, note=f"note by {self.user}"))
                self.desk.notes_sent.add(f"note by {self.user}")
                await self.act(
                    f.Send(
                        conv=conv,
                        client_msg_id=f"r-{message.seq}",
                        type="text",
                        body=msgspec.Raw(b'{"text":"one moment"}'),
                    )
                )  # refused if the transfer went through: the new agent greets instead
            else:
                if info < 0.4:
                    await self.act(
                        f.Send(
                            conv=conv,
                            client_msg_id=f"n-{message.seq}",
                            type="note",
                            body=msgspec.Raw(msgspec.json.encode({"text": f"note by {self.user}"})),
                        )
                    )
                    self.desk.notes_sent.add(f"note by {self.user}")
                await self.act(
                    f.Send(
                        conv=conv,
                        client_msg_id=f"r-{message.seq}",
                        type="text",
                        body=msgspec.Raw(b'{"text":"thanks, noted"}'),
                    )
                )


async def test_a_busy_hour(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    config = make_config(
        tmp_path / "data",
        agent_offline_grace=0.5,
        accept_timeout=5.0,
        sweep_interval=0.05,
        queue_update_interval=0.05,
        inactivity_warning=0,
        inactivity_close=0,
        rate_per_second=1000,
        rate_burst=1000,
    )
    server = Server(config)
    await server.start()
    routing = server.node.routing
    assert isinstance(routing, MemoryRouting)
    audit = Audit(routing)
    desk_log = Desk()
    try:
        for group in GROUPS:
            await server.node.desk.save_group(Group(id=group, name=group.title()))
        agent_groups: dict[str, tuple[str, ...]] = {}
        for i in range(AGENTS):
            groups = (GROUPS[i % 3],) if i % 4 else (GROUPS[i % 3], GROUPS[(i + 1) % 3])
            agent_groups[f"agent-{i}"] = groups
            await server.node.desk.save_agent(
                Agent(id=f"agent-{i}", name=f"A{i}", capacity=2 + i % 3, groups=groups)
            )
        async with aiohttp.ClientSession() as http:
            names = list(agent_groups)
            bots = [
                AgentBot(
                    server.url, a, agent_groups[a], random.Random(SEED + n), desk_log, http, names
                )
                for n, a in enumerate(names)
            ]
            await asyncio.gather(*(b.start() for b in bots))

            async def vanish(bot: AgentBot) -> None:
                await asyncio.sleep(2.0)
                await bot.stop()  # every connection gone
                await asyncio.sleep(1.2)  # past the grace period
                await bot.start()

            async def arrive(n: int) -> None:
                await asyncio.sleep(rng.uniform(0, 6.0))
                await run_customer(
                    server.url,
                    f"cust-{n}",
                    rng.choice(GROUPS),
                    random.Random(SEED * n),
                    desk_log,
                    http,
                )

            chaos = [asyncio.ensure_future(vanish(bots[0])), asyncio.ensure_future(vanish(bots[1]))]
            results = await asyncio.wait_for(
                asyncio.gather(*(arrive(n) for n in range(CUSTOMERS)), return_exceptions=True), 60
            )
            await asyncio.gather(*chaos)
            failures = [r for r in results if isinstance(r, BaseException)]
            if failures:
                stuck = [c for c in desk_log.conv_of if c not in desk_log.finished][:3]
                for customer in stuck:
                    conv = desk_log.conv_of[customer]
                    rows = await server.node.store.messages_after(conv, 0, 100)
                    print(customer, await server.node.store.get_conversation(conv, fresh=True))
                    for m in rows:
                        print("   ", m.seq, m.sender, m.type, m.body[:120])
                    print("    seen:", [m.seq for m in desk_log.customer_seen.get(customer, [])])
                    print("    refused:", [r for r in desk_log.refusals if r[2] == conv])
            assert not failures, failures[:3]
            assert len(desk_log.finished) == CUSTOMERS

            # the agents catch up with whatever they hold
            await asyncio.sleep(0.3)
            for bot in bots:
                assert bot.client is not None
                for conv in list(bot.client.last_seq):
                    with contextlib.suppress(ClientError):  # not theirs any more
                        await bot.client.sync(conv)

            # -- 1 and 2: capacity and single ownership, after every routing step -------------
            assert audit.violations == [], audit.violations[:5]
            # -- 2: assigned exactly once per stay in the queue ---------------------------------
            store = server.node.store
            histories: dict[str, list[f.Message]] = {}
            for conv in desk_log.conv_of.values():
                rows = await store.messages_after(conv, 0, 10_000)
                assert [m.seq for m in rows] == list(range(1, len(rows) + 1))
                histories[conv] = [message_frame(m) for m in rows]
            for conv, history in histories.items():
                holder: str | None = None
                queued = True
                for message in history:
                    event = event_of(message)
                    if event is None:
                        continue
                    name, data = event
                    if name in ("assigned", "picked"):
                        assert queued and holder is None, (conv, name, holder)
                        holder, queued = data["agent"], False
                    elif name == "transferred":
                        assert holder == data["from"] and not queued, (conv, name)
                        holder = data["to"]
                    elif name == "requeued":
                        assert not queued or data["reason"] == "transfer", (conv, name)
                        holder, queued = None, True
                    elif name == "resolved":
                        assert holder is not None and not queued
                        holder = None
                assert not queued and holder is None, (conv, "not resolved")
                stays = sum(
                    1 for m in history if (e := event_of(m)) and e[0] in ("queued", "requeued")
                )
                assigned = sum(
                    1 for m in history if (e := event_of(m)) and e[0] in ("assigned", "picked")
                )
                assert assigned == stays == audit.assignments[conv] == audit.stays[conv], conv

            # -- 4 and 5: exactly once, notes never to a customer ----------------------------------
            for customer, conv in desk_log.conv_of.items():
                seen = [m for m in desk_log.customer_seen[customer] if m.conv == conv]
                public = [m.seq for m in histories[conv] if m.type != "note"]
                assert [m.seq for m in seen] == public, customer
                assert all(m.type != "note" for m in seen)
            for bot in bots:
                for conv, seen_by_bot in bot.seen.items():
                    seqs = [m.seq for m in seen_by_bot]
                    assert seqs == sorted(set(seqs)), (bot.user, conv)  # once, in order
            assert desk_log.notes_sent, "the scenario wrote no private notes"

            admin = {"Authorization": f"Bearer {token('boss', 'admin')}"}
            some = list(desk_log.conv_of.items())[:20]
            for customer, conv in some:
                auth = {"Authorization": f"Bearer {token(customer, 'customer')}"}
                async with http.get(
                    f"{server.url}/api/v1/conversations/{conv}/messages?limit=200", headers=auth
                ) as resp:
                    page = await resp.json()
                assert all(m["type"] != "note" for m in page["messages"])
                async with http.get(
                    f"{server.url}/api/v1/conversations?q=note%20by", headers=auth
                ) as resp:
                    assert (await resp.json())["conversations"] == []

            # -- 6: reports agree with the events ----------------------------------------------
            expected: dict[str, dict[str, Any]] = {}
            for conv, history in histories.items():
                final = await store.get_conversation(conv, fresh=True)
                assert final is not None
                row = expected.setdefault(
                    final.group_id or "general",
                    {"conversations": 0, "resolved": 0, "assigned": 0, "scores": []},
                )
                row["conversations"] += 1
                names = [e[0] for m in history if (e := event_of(m))]
                row["resolved"] += "resolved" in names
                row["assigned"] += "assigned" in names or "picked" in names
                if conv in desk_log.ratings:
                    row["scores"].append(desk_log.ratings[conv])
            async with http.get(
                f"{server.url}/api/v1/reports?by=group&from=0", headers=admin
            ) as resp:
                assert resp.status == 200
                report = {r["key"]: r for r in (await resp.json())["rows"]}
            assert set(report) == set(expected)
            for group, want in expected.items():
                got = report[group]
                assert got["conversations"] == want["conversations"], group
                assert got["resolved"] == want["resolved"], group
                assert got["assigned"] == want["assigned"], group
                assert got["abandoned"] == 0
                assert got["csat_count"] == len(want["scores"])
                if want["scores"]:
                    avg = sum(want["scores"]) / len(want["scores"])
                    assert got["csat_avg"] == pytest.approx(avg, abs=0.001)
            await asyncio.gather(*(b.stop() for b in bots))
    finally:
        await server.stop()
