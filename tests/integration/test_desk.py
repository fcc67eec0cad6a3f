"""The help desk over WebSocket, against a real in-process node.

Groups and agents are configured by calling the desk in-process (as the REST API would);
everything else goes through the wire protocol. Every client keeps a log of every frame it
received, so a test can wait for a push that arrived before the reply it was waiting for,
and can check afterwards that some frame never arrived (a ``ping`` round trip is the
barrier: a push queued before the pong is received before it).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kefu import schedule
from kefu.model import Agent, Conversation, Group, RoutingMode
from kefu.server import Server
from tests.conftest import make_config, token

Frame = dict[str, Any]
Pred = Callable[[Frame], bool]

#: Timers fast enough for tests; the accept timeout and inactivity are off unless a test
#: turns them on (they would move conversations under the other tests' feet).
FAST = {
    "accept_timeout": 0.0,
    "agent_offline_grace": 0.4,
    "sweep_interval": 0.05,
    "queue_update_interval": 0.02,
    "inactivity_warning": 0.0,
    "inactivity_close": 0.0,
}
#: Long enough for the dispatcher and the position pusher to have acted on anything.
SETTLE = 0.25


class Client:
    """A WebSocket client that logs every frame it receives."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, user: str, role: str) -> None:
        self.ws = ws
        self.user = user
        self.role = role
        self.frames: list[Frame] = []
        self._taken: set[int] = set()
        self._changed = asyncio.Event()
        self._ids = itertools.count(1)
        self._done = False
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    self.frames.append(json.loads(msg.data))
                    self._changed.set()
        finally:
            self._done = True
            self._changed.set()

    def __repr__(self) -> str:
        return f"<{self.role} {self.user}>"

    async def send(self, frame: Frame) -> None:
        await self.ws.send_str(json.dumps(frame))

    async def expect(self, pred: Pred, timeout: float = 5.0, what: str = "") -> Frame:
        """The first frame matching ``pred`` not returned by an earlier ``expect``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for i, frame in enumerate(self.frames):
                if i not in self._taken and pred(frame):
                    self._taken.add(i)
                    return frame
            remaining = deadline - loop.time()
            if self._done or remaining <= 0:
                raise AssertionError(
                    f"{self!r}: no frame {what} within {timeout}s; last frames: {self.frames[-8:]}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def request(self, op: str, timeout: float = 5.0, **fields: Any) -> Frame:
        rid = f"{op}-{next(self._ids)}"
        await self.send({"op": op, "id": rid, **fields})
        return await self.expect(lambda fr: fr.get("id") == rid, timeout, f"replying to {rid}")

    async def ok(self, op: str, reply_op: str, **fields: Any) -> Frame:
        reply = await self.request(op, **fields)
        assert reply["op"] == reply_op, (op, fields, reply)
        return reply

    async def error(self, op: str, code: str, **fields: Any) -> Frame:
        reply = await self.request(op, **fields)
        assert reply["op"] == "error" and reply["code"] == code, (op, fields, reply)
        return reply

    async def conv_op(self, op: str, **fields: Any) -> Frame:
        """A lifecycle op answered by a ``conversation`` frame; returns the conversation."""
        info: Frame = (await self.ok(op, "conversation", **fields))["conversation"]
        return info

    async def send_text(
        self, conv: str, text: str, *, cmid: str | None = None, type: str = "text"
    ) -> Frame:
        cmid = cmid or f"{self.user}-{next(self._ids)}"
        return await self.ok(
            "send", "ack", conv=conv, client_msg_id=cmid, type=type, body={"text": text}
        )

    async def barrier(self) -> None:
        """Every push queued for this client before now has been received."""
        await self.ok("ping", "pong")

    async def event(self, conv: str, name: str, timeout: float = 5.0, **data: Any) -> Frame:
        """Wait for the system message of event ``name`` (whose data includes ``data``)."""

        def match(fr: Frame) -> bool:
            if fr.get("op") != "message" or fr["conv"] != conv or fr["type"] != "system":
                return False
            body = fr["body"]
            return bool(
                body["event"] == name and all(body["data"].get(k) == v for k, v in data.items())
            )

        return await self.expect(match, timeout, f"event {name} {data} in {conv}")

    async def conversation(self, conv: str, timeout: float = 5.0, **fields: Any) -> Frame:
        """Wait for a pushed ``conversation`` frame of ``conv`` with ``fields``."""

        def match(fr: Frame) -> bool:
            if fr.get("op") != "conversation" or "id" in fr:
                return False
            info = fr["conversation"]
            return bool(info["conv"] == conv and all(info.get(k) == v for k, v in fields.items()))

        info: Frame = (await self.expect(match, timeout, f"conversation {conv} {fields}"))[
            "conversation"
        ]
        return info

    async def agent_frame(self, timeout: float = 5.0, **fields: Any) -> Frame:
        def match(fr: Frame) -> bool:
            return fr.get("op") == "agent" and all(fr.get(k) == v for k, v in fields.items())

        return await self.expect(match, timeout, f"agent frame {fields}")

    async def position(self, conv: str, timeout: float = 5.0, **fields: Any) -> Frame:
        def match(fr: Frame) -> bool:
            return (
                fr.get("op") == "queue_position"
                and fr["conv"] == conv
                and all(fr.get(k) == v for k, v in fields.items())
            )

        return await self.expect(match, timeout, f"queue_position {conv} {fields}")

    def pushed(self, pred: Pred) -> list[Frame]:
        """Every frame received so far that matches ``pred`` (taken or not)."""
        return [fr for fr in self.frames if pred(fr)]

    def messages(self, conv: str) -> list[Frame]:
        return self.pushed(lambda fr: fr.get("op") == "message" and fr["conv"] == conv)

    async def info(self, conv: str) -> Frame:
        """The conversation as ``convs`` lists it for this user."""
        reply = await self.ok("convs", "conversations")
        for info in reply["conversations"]:
            if info["conv"] == conv:
                found: Frame = info
                return found
        raise AssertionError(f"{conv} not in {self!r}'s convs: {reply}")

    async def sync(self, conv: str, **fields: Any) -> Frame:
        return await self.ok("sync", "messages", conv=conv, **fields)

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class Harness:
    """A started node, its HTTP client session and the clients connected to it."""

    def __init__(self, server: Server, http: aiohttp.ClientSession) -> None:
        self.server = server
        self.http = http
        self.clients: list[Client] = []

    @property
    def desk(self) -> Any:
        return self.server.node.desk

    async def connect(self, user: str, role: str = "customer") -> Client:
        url = f"{self.server.url}/ws?user_id={user}&token={token(user, role)}"
        client = Client(await self.http.ws_connect(url), user, role)
        self.clients.append(client)
        hello = await client.expect(lambda fr: True, what="hello")
        assert hello["op"] == "hello" and hello["user"] == user, hello
        return client

    async def group(self, group_id: str, **fields: Any) -> None:
        await self.desk.save_group(Group(id=group_id, name=group_id.title(), **fields))

    async def agent(
        self,
        agent_id: str,
        *,
        capacity: int = 2,
        groups: tuple[str, ...] = ("general",),
        connect: bool = True,
    ) -> Client:
        await self.desk.save_agent(
            Agent(id=agent_id, name=agent_id.upper(), capacity=capacity, groups=groups)
        )
        client = await self.connect(agent_id, "agent")
        frame = await client.agent_frame(agent=agent_id, connected=True)
        assert frame["status"] == "online" and frame["capacity"] == capacity, frame
        await asyncio.sleep(0.005)  # a distinct "came online" ms, for the idle tie-break
        return client

    async def customer(self, user: str, group: str | None = None) -> tuple[Client, str]:
        client = await self.connect(user)
        fields = {} if group is None else {"group": group}
        info = await client.conv_op("open", **fields)
        assert info["customer"] == user
        conv = str(info["conv"])
        await client.event(conv, "queued")  # routed (the reply may come first)
        return client, conv

    async def stored(self, conv: str) -> Conversation:
        found = await self.server.node.store.get_conversation(conv, fresh=True)
        assert found is not None
        return found

    async def loads(self) -> dict[str, int]:
        return {a.id: a.load for a in await self.server.node.routing.agents()}

    async def close(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.close()
        await self.server.stop()
        await self.http.close()


MakeDesk = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make_desk(tmp_path: Path) -> AsyncIterator[MakeDesk]:
    started: list[Harness] = []

    async def _make(**overrides: Any) -> Harness:
        config = make_config(tmp_path / f"data-{len(started)}", **{**FAST, **overrides})
        server = Server(config)
        await server.start()
        harness = Harness(server, aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))
        started.append(harness)
        return harness

    try:
        yield _make
    finally:
        for harness in started:
            await harness.close()


@pytest.fixture
async def hd(make_desk: MakeDesk) -> Harness:
    return await make_desk()


def events(page: Frame) -> list[str]:
    return [m["body"]["event"] for m in page["messages"] if m["type"] == "system"]


def is_note(fr: Frame) -> bool:
    return fr.get("op") == "message" and fr["type"] == "note"


def texts(page: Frame) -> list[str]:
    return [m["body"]["text"] for m in page["messages"] if m["type"] in ("text", "note")]


async def assigned(customer: Client, agent: Client, conv: str) -> None:
    """Both sides see the conversation assigned to the agent."""
    name = agent.user
    for side in (customer, agent):
        await side.event(conv, "assigned", agent=name, state="assigned")
        await side.conversation(conv, state="assigned", agent=name)


# -- 1. open, queue, welcome, auto-assignment ------------------------------------------------


async def test_open_queues_welcomes_and_assigns(hd: Harness) -> None:
    await hd.group("sales", welcome="Hello from Sales!")
    agent = await hd.agent("agent-1", groups=("sales",))
    customer = await hd.connect("cust-1")
    reply = await customer.conv_op("open", group="sales")
    assert reply["state"] == "queued" and reply["group"] == "sales" and "agent" not in reply
    conv = reply["conv"]
    # the reply comes before the conversation's events, and no frame contradicts it later
    ops = [fr["op"] for fr in customer.frames]
    assert ops[: ops.index("conversation") + 1] == ["hello", "conversation"], customer.frames

    for side in (customer, agent):
        event = await side.event(conv, "assigned")
        assert event["body"]["data"]["agent"] == "agent-1"
        assert event["body"]["data"]["group"] == "sales"
        assert event["sender"] == "system" and event["sender_role"] == "system"
        info = await side.conversation(conv, state="assigned")
        assert info["agent"] == "agent-1" and info["group"] == "sales" and not info.get("accepted")
    frame = await agent.agent_frame(load=1)
    assert frame == {
        "op": "agent",
        "agent": "agent-1",
        "status": "online",
        "connected": True,
        "load": 1,
        "capacity": 2,
        "groups": ["sales"],
    }

    page = await customer.sync(conv)
    assert events(page) == ["queued", "welcome", "assigned"]
    queued, welcome, _ = page["messages"]
    assert queued["body"] == {"event": "queued", "data": {"group": "sales"}}
    assert welcome["body"] == {"event": "welcome", "data": {"text": "Hello from Sales!"}}
    assert [m["seq"] for m in page["messages"]] == [1, 2, 3]

    # opening again (from another tab too, at the same time) returns the same open
    # conversation, and routes nothing anew
    tabs = [await hd.connect("cust-1") for _ in range(3)]
    replies = await asyncio.gather(*(t.request("open", group="sales") for t in tabs))
    assert {r["conversation"]["conv"] for r in replies} == {conv}
    again = await customer.conv_op("open", group="sales")
    assert again["conv"] == conv and again["state"] == "assigned" and again["agent"] == "agent-1"
    await agent.barrier()
    assert (await hd.loads())["agent-1"] == 1
    assert events(await customer.sync(conv)) == ["queued", "welcome", "assigned"]
    # the agent can accept it now
    accepted = await agent.conv_op("accept", conv=conv)
    assert accepted["accepted"] is True
    await customer.event(conv, "accepted")


async def test_concurrent_first_opens_make_one_conversation(hd: Harness) -> None:
    tabs = [await hd.connect("cust-1") for _ in range(4)]
    replies = await asyncio.gather(*(t.request("open") for t in tabs))
    assert {r["op"] for r in replies} == {"conversation"}
    convs = {r["conversation"]["conv"] for r in replies}
    assert len(convs) == 1, replies
    listed = (await tabs[0].ok("convs", "conversations"))["conversations"]
    assert [i["conv"] for i in listed] == list(convs)
    assert events(await tabs[0].sync(convs.pop())) == ["queued", "leave_message"]


async def test_open_in_unknown_group_is_not_found(hd: Harness) -> None:
    customer = await hd.connect("cust-1")
    await customer.error("open", "not_found", group="nope")
    assert (await customer.ok("convs", "conversations"))["conversations"] == []


# -- 2. least loaded, longest idle, capacity ---------------------------------------------------


async def test_capacity_is_respected_and_the_waiting_customer_gets_the_freed_slot(
    hd: Harness,
) -> None:
    # agent-b comes online first: it has been idle longer, and wins the tie against agent-a
    # (whose id would win a tie broken by name)
    agent_b = await hd.agent("agent-b", capacity=1)
    agent_a = await hd.agent("agent-a", capacity=1)
    c1, conv1 = await hd.customer("cust-1")
    await assigned(c1, agent_b, conv1)
    c2, conv2 = await hd.customer("cust-2")
    await assigned(c2, agent_a, conv2)
    c3, conv3 = await hd.customer("cust-3")
    position = await c3.position(conv3, position=1)
    assert position["group"] == "general" and not position.get("backlog")
    await c3.barrier()
    await asyncio.sleep(SETTLE)
    assert (await c3.info(conv3))["state"] == "queued"
    assert await hd.loads() == {"agent-a": 1, "agent-b": 1}
    queue = await agent_a.ok("queue", "queue", group="general")
    assert [(e["conv"], e["customer"], e["position"]) for e in queue["entries"]] == [
        (conv3, "cust-3", 1)
    ]

    resolved = await agent_b.conv_op("resolve", conv=conv1)
    assert resolved["state"] == "resolved"
    await assigned(c3, agent_b, conv3)
    assert await hd.loads() == {"agent-a": 1, "agent-b": 1}
    assert (await agent_b.ok("queue", "queue", group="general"))["entries"] == []


async def test_least_loaded_agent_wins_over_the_longest_idle(hd: Harness) -> None:
    agent_x = await hd.agent("agent-x", capacity=3)
    c1, conv1 = await hd.customer("cust-1")
    await assigned(c1, agent_x, conv1)
    c2, conv2 = await hd.customer("cust-2")
    await assigned(c2, agent_x, conv2)
    # agent-y comes online later (so agent-x has been idle longer) but holds nothing
    agent_y = await hd.agent("agent-y", capacity=3)
    c3, conv3 = await hd.customer("cust-3")
    await assigned(c3, agent_y, conv3)
    c4, conv4 = await hd.customer("cust-4")
    await assigned(c4, agent_y, conv4)  # 1 < 2, though agent-x waited longer
    # now 2 each: the tie goes to agent-x, whose last assignment is the oldest
    c5, conv5 = await hd.customer("cust-5")
    await assigned(c5, agent_x, conv5)
    assert await hd.loads() == {"agent-x": 3, "agent-y": 2}


# -- 3. atomic assignment under a burst ----------------------------------------------------------


async def test_burst_of_opens_is_assigned_atomically(hd: Harness) -> None:
    agents = [await hd.agent(f"agent-{i}", capacity=5) for i in range(3)]
    customers = [await hd.connect(f"cust-{i:02d}") for i in range(30)]
    replies = await asyncio.gather(*(c.request("open") for c in customers))
    assert all(r["op"] == "conversation" for r in replies), replies
    convs = [r["conversation"]["conv"] for r in replies]
    assert len(set(convs)) == 30
    owner = dict(zip(convs, customers, strict=True))

    for agent in agents:
        await agent.agent_frame(load=5)
    for agent in agents:
        await agent.barrier()
    await asyncio.sleep(SETTLE)  # anything still to be (wrongly) assigned would be now

    states = await hd.server.node.routing.agents()
    assert sorted((a.id, a.load) for a in states) == [(f"agent-{i}", 5) for i in range(3)]
    held = [c for a in states for c in a.active]
    assert len(held) == 15 and len(set(held)) == 15  # nobody shares a conversation
    for agent in agents:
        loads = [fr["load"] for fr in agent.pushed(lambda fr: fr.get("op") == "agent")]
        assert max(loads) == 5, loads  # never above capacity, even for a moment
        listed = (await agent.ok("convs", "conversations"))["conversations"]
        mine = {i["conv"] for i in listed}
        assert all(i["state"] == "assigned" and i["agent"] == agent.user for i in listed)
        assert mine == next(a.active for a in states if a.id == agent.user)

    queued = []
    for conv, customer in owner.items():
        info = await customer.info(conv)
        # the open reply may have been sent after the assignment's push: it must not show
        # an older state than that push, so the last conversation frame is the truth
        shown = customer.pushed(
            lambda fr, conv=conv: (
                fr.get("op") == "conversation" and fr["conversation"]["conv"] == conv
            )
        )
        assert shown[-1]["conversation"]["state"] == info["state"], shown
        page = await customer.sync(conv)
        if info["state"] == "assigned":
            assert conv in held
            assert events(page).count("assigned") == 1
        else:
            assert info["state"] == "queued" and "agent" not in info
            assert conv not in held and "assigned" not in events(page)
            queued.append(conv)
    assert len(queued) == 15

    # the rest wait in the order they were queued, and each customer is told their place
    # (opens sent at the same moment have no order of their own: the ones below do)
    queue = (await agents[0].ok("queue", "queue", group="general"))["entries"]
    assert sorted(e["conv"] for e in queue) == sorted(queued)
    assert [e["position"] for e in queue] == list(range(1, 16))
    assert [e["since"] for e in queue] == sorted(e["since"] for e in queue)
    for entry in queue:
        await owner[entry["conv"]].position(entry["conv"], position=entry["position"])
    late = []
    for i in range(3):
        customer, conv = await hd.customer(f"late-{i}")
        owner[conv] = customer
        late.append(conv)
        # queued after the reply to the open (a round trip to a shared routing state)
        await customer.position(conv, position=16 + i)
    queue = (await agents[0].ok("queue", "queue", group="general"))["entries"]
    assert [e["conv"] for e in queue][15:] == late
    assert [e["position"] for e in queue] == list(range(1, 19))

    # the head of the queue gets the first freed slot, and everyone moves up one
    head = queue[0]["conv"]
    first = next(iter(next(a.active for a in states if a.id == "agent-1")))
    await agents[1].conv_op("resolve", conv=first)
    await owner[head].event(head, "assigned", agent="agent-1")
    for position, entry in enumerate(queue[1:], 1):
        await owner[entry["conv"]].position(entry["conv"], position=position)
    assert (await hd.loads())["agent-1"] == 5


# -- 4. waiting ----------------------------------------------------------------------------------


async def test_customer_reply_moves_waiting_back_to_assigned(hd: Harness) -> None:
    agent = await hd.agent("agent-1")
    customer, conv = await hd.customer("cust-1")
    await assigned(customer, agent, conv)
    await agent.send_text(conv, "Can you send the order number?")
    waiting = await agent.conv_op("wait", conv=conv)
    assert waiting["state"] == "waiting" and waiting["agent"] == "agent-1"
    await customer.event(conv, "waiting", state="waiting")
    await customer.conversation(conv, state="waiting")

    before = await customer.info(conv)
    await agent.error("wait", "invalid_transition", conv=conv)
    await customer.error("wait", "forbidden", conv=conv)
    assert await customer.info(conv) == before

    ack = await customer.send_text(conv, "It is 12345")
    assert ack["conv"] == conv
    replied = await agent.event(conv, "customer_replied", state="assigned")
    assert replied["sender"] == "cust-1" and replied["sender_role"] == "customer"
    text = await agent.expect(
        lambda fr: fr.get("op") == "message" and fr["conv"] == conv and fr["type"] == "text"
    )
    assert text["body"] == {"text": "It is 12345"} and text["seq"] == ack["seq"]
    assert replied["seq"] < ack["seq"]
    await agent.conversation(conv, state="assigned", agent="agent-1")
    assert (await customer.info(conv))["state"] == "assigned"
    assert (await hd.loads())["agent-1"] == 1


# -- 5. resolve and reopen -----------------------------------------------------------------------


async def test_resolve_then_reopen_to_the_same_agent(hd: Harness) -> None:
    agent = await hd.agent("agent-1")
    customer, conv = await hd.customer("cust-1")
    await assigned(customer, agent, conv)
    resolved = await agent.conv_op("resolve", conv=conv)
    assert resolved["state"] == "resolved"
    await customer.event(conv, "resolved", state="resolved")
    await agent.agent_frame(load=0)

    before = await customer.info(conv)
    await agent.error("resolve", "invalid_transition", conv=conv)
    await agent.error("wait", "invalid_transition", conv=conv)
    # the agent cannot write into a resolved conversation: the customer reopens it
    await agent.error(
        "send",
        "invalid_transition",
        conv=conv,
        client_msg_id="late",
        type="text",
        body={"text": "one more thing"},
    )
    assert await customer.info(conv) == before

    ack = await customer.send_text(conv, "Actually, one more question")
    assert ack["conv"] == conv
    for side in (customer, agent):
        await side.event(conv, "reopened_to_agent", agent="agent-1", state="assigned")
    await agent.conversation(conv, state="assigned", agent="agent-1")
    await agent.agent_frame(load=1)
    page = await agent.sync(conv)
    assert events(page)[-2:] == ["resolved", "reopened_to_agent"]
    assert texts(page)[-1] == "Actually, one more question"


async def test_reopen_goes_back_to_the_queue_when_the_agent_is_away(hd: Harness) -> None:
    agent = await hd.agent("agent-1")
    other = await hd.agent("agent-2")
    customer, conv = await hd.customer("cust-1")
    await assigned(customer, agent, conv)
    await agent.conv_op("resolve", conv=conv)
    await agent.ok("status", "agent", status="away")
    await customer.send_text(conv, "Hello again")
    await customer.event(conv, "reopened", state="queued")
    await assigned(customer, other, conv)


async def test_message_after_the_reopen_window_goes_to_a_successor(make_desk: MakeDesk) -> None:
    hd = await make_desk(reopen_window=0)
    agent = await hd.agent("agent-1")
    customer, conv = await hd.customer("cust-1")
    await assigned(customer, agent, conv)
    await agent.conv_op("resolve", conv=conv)
    await customer.event(conv, "resolved")

    ack = await customer.send_text(conv, "New problem", cmid="n1")
    successor = ack["conv"]
    assert successor != conv and ack["seq"] > 1
    await customer.event(conv, "closed", reason="expired", state="closed")
    old = await customer.info(conv)
    assert old["state"] == "closed" and old["successor"] == successor
    assert "New problem" not in texts(await customer.sync(conv))
    assert "New problem" not in texts(await agent.sync(conv))
    # the successor is routed like a new conversation, preferring the previous agent
    await customer.event(successor, "queued", previous=conv)
    await assigned(customer, agent, successor)
    assert texts(await agent.sync(successor)) == ["New problem"]


# -- 6. closed conversations ---------------------------------------------------------------------


async def test_closed_conversation_continues_in_one_successor(hd: Harness) -> None:
    agent = await hd.agent("agent-1")
    customer, conv = await hd.customer("cust-1")
    await assigned(customer, agent, conv)
    closed = await agent.conv_op("close", conv=conv)
    assert closed["state"] == "closed"
    await customer.event(conv, "closed", reason="agent", state="closed")
    await agent.agent_frame(load=0)

    before = await customer.info(conv)
    await agent.error("close", "invalid_transition", conv=conv)
    await agent.error(
        "send",
        "conversation_closed",
        conv=conv,
        client_msg_id="a1",
        type="text",
        body={"text": "bye"},
    )
    await agent.error("accept", "not_found", conv="nope")
    assert await customer.info(conv) == before

    first = await customer.send_text(conv, "I am back", cmid="back-1")
    successor = first["conv"]
    assert successor != conv and not first.get("duplicate")
    again = await customer.send_text(conv, "I am back", cmid="back-1")
    assert again["duplicate"] is True
    assert (again["conv"], again["seq"], again["msg_id"]) == (
        successor,
        first["seq"],
        first["msg_id"],
    )
    assert (await customer.info(conv))["successor"] == successor
    page = await customer.sync(successor)
    assert texts(page) == ["I am back"]
    assert events(page)[0] == "queued"
    assert texts(await customer.sync(conv)) == []
    listed = (await customer.ok("convs", "conversations"))["conversations"]
    assert sorted(i["conv"] for i in listed) == sorted([conv, successor])


# -- 7. transfer ---------------------------------------------------------------------------------


async def test_transfer_to_an_agent_keeps_the_note_private(hd: Harness) -> None:
    old = await hd.agent("agent-1")
    customer, conv = await hd.customer("cust-1")
    await assigned(customer, old, conv)
    await customer.send_text(conv, "My parcel is lost")
    new = await hd.agent("agent-2")

    info = await old.conv_op("transfer", conv=conv, agent="agent-2", note="VIP: refund ok")
    assert info["agent"] == "agent-2" and info["state"] == "assigned"
    for side in (customer, old, new):
        await side.event(conv, "transferred", **{"from": "agent-1", "to": "agent-2"})
    note = await new.expect(is_note)
    assert note["body"] == {"text": "VIP: refund ok"} and note["sender"] == "agent-1"
    await new.conversation(conv, agent="agent-2")
    await old.conversation(conv, agent="agent-2")
    await customer.conversation(conv, agent="agent-2")
    await new.agent_frame(load=1)
    await old.agent_frame(load=0)
    assert await hd.loads() == {"agent-1": 0, "agent-2": 1}

    await customer.barrier()
    assert customer.pushed(is_note) == []
    assert old.pushed(is_note) == []
    page = await new.sync(conv)
    assert texts(page) == ["My parcel is lost", "VIP: refund ok"]
    assert events(page) == ["queued", "assigned", "transferred"]
    customer_page = await customer.sync(conv)
    assert texts(customer_page) == ["My parcel is lost"]
    assert customer_page["last_seq"] == page["last_seq"]
    await old.error("sync", "forbidden", conv=conv)
    await old.error("history", "forbidden", conv=conv)
    await old.error(
        "send", "forbidden", conv=conv, client_msg_id="x", type="text", body={"text": "hi"}
    )

    # what may not be transferred, or not there, changes nothing
    await hd.group("other")
    full = await hd.agent("agent-3", capacity=1, groups=("other",))
    busy_customer, busy_conv = await hd.customer("cust-9", "other")
    await assigned(busy_customer, full, busy_conv)
    before = await customer.info(conv)
    await new.error("transfer", "not_found", conv=conv, agent="ghost")
    await new.error("transfer", "not_found", conv=conv, group="nowhere")
    await new.error("transfer", "agent_unavailable", conv=conv, agent="agent-3")
    await new.error("transfer", "invalid_transition", conv=conv, agent="agent-2")
    await new.error("transfer", "invalid_argument", conv=conv, agent="agent-1", group="general")
    await new.error("transfer", "invalid_argument", conv=conv)
    await customer.error("transfer", "forbidden", conv=conv, agent="agent-1")
    await old.error("transfer", "forbidden", conv=conv, agent="agent-1")
    assert await customer.info(conv) == before
    assert await hd.loads() == {"agent-1": 0, "agent-2": 1, "agent-3": 1}


async def test_transfer_to_a_group_goes_to_the_head_of_its_queue(hd: Harness) -> None:
    await hd.group("billing")
    holder = await hd.agent("agent-1")
    biller = await hd.agent("biller", capacity=1, groups=("billing",))
    admin = await hd.connect("boss", "admin")
    # billing is busy: its one agent holds a conversation, another customer waits live
    b1, bconv1 = await hd.customer("cust-b1", "billing")
    await assigned(b1, biller, bconv1)
    b2, bconv2 = await hd.customer("cust-b2", "billing")
    await b2.position(bconv2, position=1)

    customer, conv = await hd.customer("cust-1")
    await assigned(customer, holder, conv)
    info = await holder.conv_op("transfer", conv=conv, group="billing", note="needs a refund")
    assert info["state"] == "queued" and info["group"] == "billing" and "agent" not in info
    await customer.event(
        conv, "requeued", reason="transfer", group="billing", state="queued", **{"from": "agent-1"}
    )
    await holder.agent_frame(load=0)
    await customer.position(conv, group="billing", position=1)
    await b2.position(bconv2, position=2)
    queue = (await admin.ok("queue", "queue", group="billing"))["entries"]
    assert [(e["conv"], e["position"]) for e in queue] == [(conv, 1), (bconv2, 2)]
    await customer.barrier()
    assert customer.pushed(is_note) == []

    await biller.conv_op("resolve", conv=bconv1)
    await assigned(customer, biller, conv)
    # the billing agent reads the note left with the transfer
    assert "needs a refund" in texts(await biller.sync(conv))
    await b2.position(bconv2, position=1)


# -- 8. private notes ----------------------------------------------------------------------------


async def test_private_notes_never_reach_the_customer(hd: Harness) -> None:
    agent = await hd.agent("agent-1")
    admin = await hd.connect("boss", "admin")
    customer, conv = await hd.customer("cust-1")
    await assigned(customer, agent, conv)
    await admin.conv_op("watch", conv=conv)

    await customer.send_text(conv, "Hi")
    await agent.send_text(conv, "Hello, checking")
    note = await agent.send_text(conv, "customer seems upset", type="note")
    await admin.expect(lambda fr: is_note(fr) and fr["seq"] == note["seq"])
    whisper = await admin.send_text(conv, "offer a voucher", type="note")
    pushed = await agent.expect(lambda fr: is_note(fr) and fr["seq"] == whisper["seq"])
    assert pushed["sender"] == "boss" and pushed["sender_role"] == "admin"
    assert pushed["body"] == {"text": "offer a voucher"}

    await customer.barrier()
    assert customer.pushed(is_note) == []
    last = whisper["seq"]

    page = await customer.sync(conv)
    assert texts(page) == ["Hi", "Hello, checking"]
    assert page["last_seq"] == last and page["has_more"] is False
    page = await customer.sync(conv, after_seq=note["seq"] - 1)
    assert page["messages"] == [] and page["last_seq"] == last
    page = await customer.ok("history", "messages", conv=conv)
    assert texts(page) == ["Hi", "Hello, checking"]
    assert page["last_seq"] == last and page["has_more"] is False
    # the newest two are notes: the page must still give the customer a message to page
    # back from (history continues from the first message's seq), not an empty page
    page = await customer.ok("history", "messages", conv=conv, limit=2)
    assert texts(page) == ["Hi", "Hello, checking"] and page["has_more"] is True
    older = await customer.ok(
        "history", "messages", conv=conv, limit=2, before_seq=page["messages"][0]["seq"]
    )
    assert events(older) == ["queued", "assigned"] and older["has_more"] is False
    agent_page = await agent.sync(conv)
    assert texts(agent_page) == ["Hi", "Hello, checking", "customer seems upset", "offer a voucher"]
    assert agent_page["last_seq"] == last
    admin_page = await admin.ok("history", "messages", conv=conv)
    assert texts(admin_page) == texts(agent_page)
    assert (await customer.info(conv))["last_seq"] == last

    before = await customer.info(conv)
    await customer.error(
        "send", "forbidden", conv=conv, client_msg_id="n", type="note", body={"text": "x"}
    )
    assert await customer.info(conv) == before


async def test_notes_on_a_queued_conversation_stay_internal(hd: Harness) -> None:
    await hd.group("pool", mode=RoutingMode.POOL)
    agent = await hd.agent("agent-1", groups=("pool",))
    customer, conv = await hd.customer("cust-1", "pool")
    await customer.send_text(conv, "anyone?")
    note = await agent.send_text(conv, "I'll take it after lunch", type="note")
    assert note["conv"] == conv
    await customer.barrier()
    assert customer.pushed(is_note) == []
    assert texts(await customer.sync(conv)) == ["anyone?"]
    assert texts(await agent.sync(conv)) == ["anyone?", "I'll take it after lunch"]
    # but an agent of the group may not write to the customer before picking it
    await agent.error(
        "send", "forbidden", conv=conv, client_msg_id="t", type="text", body={"text": "hi"}
    )


# -- 9. accept -----------------------------------------------------------------------------------


async def test_accept_rules(hd: Harness) -> None:
    agent = await hd.agent("agent-1")
    other = await hd.agent("agent-2")
    customer, conv = await hd.customer("cust-1")
    await assigned(customer, agent, conv)
    before = await customer.info(conv)
    await other.error("accept", "forbidden", conv=conv)
    await customer.error("accept", "forbidden", conv=conv)
    assert await customer.info(conv) == before
    info = await agent.conv_op("accept", conv=conv)
    assert info["accepted"] is True
    await customer.event(conv, "accepted", state="assigned")
    after = await customer.info(conv)
    await agent.error("accept", "invalid_transition", conv=conv)
    assert await customer.info(conv) == after


async def test_unaccepted_assignment_goes_to_another_agent(make_desk: MakeDesk) -> None:
    hd = await make_desk(accept_timeout=0.4)
    slow = await hd.agent("agent-1")
    other = await hd.agent("agent-2")
    customer, conv = await hd.customer("cust-1")
    await assigned(customer, slow, conv)
    requeued = await customer.event(conv, "requeued", reason="accept_timeout", state="queued")
    assert requeued["body"]["data"]["from"] == "agent-1"
    await slow.event(conv, "requeued", reason="accept_timeout")
    await slow.agent_frame(agent="agent-1", status="away")  # missed it: set away
    await assigned(customer, other, conv)
    await other.conv_op("accept", conv=conv)
    await slow.agent_frame(load=0)
    assert await hd.loads() == {"agent-1": 0, "agent-2": 1}
    await asyncio.sleep(0.6)  # past another accept timeout: accepted, so it stays
    info = await customer.info(conv)
    assert info["agent"] == "agent-2" and info["accepted"] is True
    await slow.error("accept", "forbidden", conv=conv)


async def test_the_only_agent_gets_a_missed_conversation_back_when_online(
    make_desk: MakeDesk,
) -> None:
    hd = await make_desk(accept_timeout=0.3)
    agent = await hd.agent("agent-1")
    customer, conv = await hd.customer("cust-1")
    await assigned(customer, agent, conv)
    await customer.event(conv, "requeued", reason="accept_timeout", state="queued")
    await agent.agent_frame(status="away", load=0)
    await asyncio.sleep(0.3)  # away: nothing is assigned to them
    assert (await customer.info(conv))["state"] == "queued"
    await agent.ok("status", "agent", status="online")
    await customer.event(conv, "assigned", agent="agent-1", state="assigned")
    await agent.ok("accept", "conversation", conv=conv)


async def test_nothing_is_assigned_out_of_hours(hd: Harness) -> None:
    today = dt.datetime.now(dt.UTC).weekday()
    closed_day = schedule.DAYS[(today + 3) % 7]
    hours = {"timezone": "UTC", "hours": {closed_day: [["00:00", "24:00"]]}}
    await hd.group("night", schedule=hours)
    agent = await hd.agent("agent-1", groups=("night",))  # online, yet the group is closed
    customer, conv = await hd.customer("cust-1", "night")
    await customer.event(conv, "leave_message", reason="out_of_hours")
    await asyncio.sleep(0.3)
    assert (await customer.info(conv))["state"] == "queued"
    # opening time (here: the schedule is lifted): the left message is assigned
    await hd.group("night", schedule=None)
    await assigned(customer, agent, conv)


async def test_replying_counts_as_accepting(make_desk: MakeDesk) -> None:
    hd = await make_desk(accept_timeout=0.4)
    agent = await hd.agent("agent-1")
    await hd.agent("agent-2")
    customer, conv = await hd.customer("cust-1")
    await assigned(customer, agent, conv)
    await agent.send_text(conv, "Hi, how can I help?")
    await customer.conversation(conv, accepted=True)
    await asyncio.sleep(0.6)
    info = await customer.info(conv)
    assert info["agent"] == "agent-1" and info["accepted"] is True
    assert "requeued" not in events(await customer.sync(conv))


# -- 10. agents going offline ----------------------------------------------------------------------


async def test_agent_gone_past_the_grace_period_is_requeued(hd: Harness) -> None:
    first = await hd.agent("agent-1")
    second = await hd.connect("agent-1", "agent")  # one agent, two connections
    for conn in (first, second):
        await conn.agent_frame(agent="agent-1", connected=True, load=0)
    customer, conv = await hd.customer("cust-1")
    await assigned(customer, first, conv)
    await second.event(conv, "assigned", agent="agent-1")
    for conn in (first, second):
        await conn.agent_frame(load=1)
    other = await hd.agent("agent-2")

    await first.close()
    await asyncio.sleep(0.4 + 0.2)  # past the grace: one connection is left, nothing moves
    info = await customer.info(conv)
    assert info["agent"] == "agent-1" and info["state"] == "assigned"

    await second.close()
    requeued = await customer.event(conv, "requeued", reason="agent_offline", state="queued")
    assert requeued["body"]["data"]["from"] == "agent-1"
    await assigned(customer, other, conv)
    assert await hd.loads() == {"agent-1": 0, "agent-2": 1}
    page = await customer.sync(conv)
    assert events(page) == ["queued", "assigned", "requeued", "assigned"]


async def test_agent_reconnecting_within_the_grace_keeps_the_conversation(hd: Harness) -> None:
    agent = await hd.agent("agent-1")
    customer, conv = await hd.customer("cust-1")
    await assigned(customer, agent, conv)
    await agent.close()
    back = await hd.connect("agent-1", "agent")
    await back.agent_frame(connected=True, load=1)
    await asyncio.sleep(0.4 + 0.2)
    assert "requeued" not in events(await customer.sync(conv))
    assert (await back.info(conv))["agent"] == "agent-1"


async def test_agent_set_up_while_connected_is_online(hd: Harness) -> None:
    agent = await hd.connect("agent-1", "agent")  # not set up yet
    await agent.error("status", "not_found", status="online")
    await hd.desk.save_agent(Agent(id="agent-1", name="A1", capacity=2, groups=("general",)))
    frame = await agent.agent_frame(agent="agent-1")
    assert frame["connected"] is True and frame["status"] == "online", frame
    customer, conv = await hd.customer("cust-1")
    await assigned(customer, agent, conv)
    await agent.close()
    await customer.event(conv, "requeued", reason="agent_offline")


# -- 11. status --------------------------------------------------------------------------------------


async def test_away_agents_get_nothing_new_until_back_online(hd: Harness) -> None:
    agent = await hd.agent("agent-1")
    away = await agent.ok("status", "agent", status="away")
    assert away["status"] == "away" and away["connected"] is True and away["load"] == 0
    customer, conv = await hd.customer("cust-1")
    await customer.event(conv, "leave_message", reason="no_agents")
    await customer.barrier()
    await asyncio.sleep(SETTLE)
    assert (await customer.info(conv))["state"] == "queued"
    assert (await hd.loads())["agent-1"] == 0

    before = await customer.info(conv)
    await customer.error("status", "forbidden", status="online")
    assert await customer.info(conv) == before

    online = await agent.ok("status", "agent", status="online")
    assert online["status"] == "online"
    await assigned(customer, agent, conv)
    await agent.agent_frame(load=1)


async def test_going_offline_hands_conversations_back(hd: Harness) -> None:
    agent = await hd.agent("agent-1")
    customer, conv = await hd.customer("cust-1")
    await assigned(customer, agent, conv)
    other = await hd.agent("agent-2")
    offline = await agent.ok("status", "agent", status="offline")
    assert offline["status"] == "offline"
    await customer.event(conv, "requeued", reason="agent_offline")
    await assigned(customer, other, conv)
    await agent.agent_frame(load=0)


# -- 12. pool mode -------------------------------------------------------------------------------------


async def test_pool_groups_are_picked_not_assigned(hd: Harness) -> None:
    await hd.group("pool", mode=RoutingMode.POOL)
    picker = await hd.agent("picker", groups=("pool",))
    outsider = await hd.agent("outsider")
    customer, conv = await hd.customer("cust-1", "pool")
    await customer.position(conv, group="pool", position=1)
    await customer.barrier()
    await asyncio.sleep(SETTLE)
    assert (await customer.info(conv))["state"] == "queued"

    queue = await picker.ok("queue", "queue", group="pool")
    assert queue["group"] == "pool"
    assert [(e["conv"], e["customer"], e["position"]) for e in queue["entries"]] == [
        (conv, "cust-1", 1)
    ]
    assert "backlog" not in queue["entries"][0]
    # a queued conversation of their group is readable by the group's agents
    assert events(await picker.sync(conv)) == ["queued"]

    before = await customer.info(conv)
    await outsider.error("queue", "not_member", group="pool")
    await outsider.error("pick", "not_member", conv=conv)
    await outsider.error("sync", "forbidden", conv=conv)
    await customer.error("pick", "forbidden", conv=conv)
    await customer.error("queue", "forbidden", group="pool")
    await picker.error("queue", "not_found", group="nope")
    await picker.error("pick", "not_found", conv="nope")
    assert await customer.info(conv) == before
    assert len((await picker.ok("queue", "queue", group="pool"))["entries"]) == 1

    info = await picker.conv_op("pick", conv=conv)
    assert info["state"] == "assigned" and info["agent"] == "picker"
    await customer.event(conv, "picked", agent="picker", group="pool", state="assigned")
    await customer.conversation(conv, state="assigned", agent="picker")
    await picker.agent_frame(load=1)
    assert (await picker.ok("queue", "queue", group="pool"))["entries"] == []
    await picker.error("pick", "invalid_transition", conv=conv)
    assert await hd.loads() == {"picker": 1, "outsider": 0}


async def test_pick_at_capacity_is_refused(hd: Harness) -> None:
    await hd.group("pool", mode=RoutingMode.POOL)
    picker = await hd.agent("picker", capacity=1, groups=("pool",))
    _, conv1 = await hd.customer("cust-1", "pool")
    c2, conv2 = await hd.customer("cust-2", "pool")
    await picker.conv_op("pick", conv=conv1)
    before = await c2.info(conv2)
    await picker.error("pick", "agent_unavailable", conv=conv2)
    assert await c2.info(conv2) == before
    queue = (await picker.ok("queue", "queue", group="pool"))["entries"]
    assert [e["conv"] for e in queue] == [conv2]


# -- 13. overflow ------------------------------------------------------------------------------------


async def test_full_queue_offers_leave_a_message(hd: Harness) -> None:
    await hd.group("billing", max_queue=1)
    agent = await hd.agent("agent-1", capacity=1, groups=("billing",))
    c0, conv0 = await hd.customer("cust-0", "billing")
    await assigned(c0, agent, conv0)
    c1, conv1 = await hd.customer("cust-1", "billing")
    await c1.position(conv1, position=1)
    c2, conv2 = await hd.customer("cust-2", "billing")
    offer = await c2.event(conv2, "leave_message", reason="queue_full")
    assert offer["body"]["data"]["text"]
    position = await c2.position(conv2, position=0)
    assert position["backlog"] is True and position.get("estimated_wait") is None
    assert (await c2.info(conv2))["state"] == "queued"
    await c1.barrier()
    assert not c1.pushed(
        lambda fr: fr.get("op") == "message" and fr["body"].get("event") == "leave_message"
    )
    queue = (await agent.ok("queue", "queue", group="billing"))["entries"]
    assert [(e["conv"], e["position"], e.get("backlog", False)) for e in queue] == [
        (conv1, 1, False),
        (conv2, 0, True),
    ]
    # the left message is still served, after the live queue
    await c2.send_text(conv2, "Please call me back")
    await agent.conv_op("resolve", conv=conv0)
    await assigned(c1, agent, conv1)
    await agent.conv_op("resolve", conv=conv1)
    await assigned(c2, agent, conv2)
    assert texts(await agent.sync(conv2)) == ["Please call me back"]


async def test_closed_schedule_offers_leave_a_message(hd: Harness) -> None:
    today = dt.datetime.now(dt.UTC).weekday()
    closed_day = schedule.DAYS[(today + 3) % 7]  # never today, even across midnight
    await hd.group(
        "night",
        schedule={"timezone": "UTC", "hours": {closed_day: [["00:00", "24:00"]]}},
        out_of_hours_message="We open on " + closed_day,
    )
    # out of hours wins over "no agents" (the only agent is away: nothing is assigned)
    agent = await hd.agent("agent-1", groups=("night",))
    await agent.ok("status", "agent", status="away")
    customer, conv = await hd.customer("cust-1", "night")
    offer = await customer.event(conv, "leave_message", reason="out_of_hours")
    assert offer["body"]["data"] == {"reason": "out_of_hours", "text": "We open on " + closed_day}
    await customer.position(conv, group="night", position=0, backlog=True)
    assert (await customer.info(conv))["state"] == "queued"
    queue = (await agent.ok("queue", "queue", group="night"))["entries"]
    assert [(e["conv"], e["position"], e.get("backlog")) for e in queue] == [(conv, 0, True)]


async def test_no_agent_online_offers_leave_a_message(hd: Harness) -> None:
    await hd.desk.save_agent(Agent(id="agent-1", name="A1", capacity=2, groups=("general",)))
    customer, conv = await hd.customer("cust-1")
    offer = await customer.event(conv, "leave_message", reason="no_agents")
    assert offer["body"]["data"]["text"]
    await customer.position(conv, position=0, backlog=True)
    page = await customer.sync(conv)
    assert events(page) == ["queued", "leave_message"]
    # when an agent comes online, the left message is assigned
    agent = await hd.connect("agent-1", "agent")
    await assigned(customer, agent, conv)


async def test_waiting_past_max_wait_offers_leave_a_message(hd: Harness) -> None:
    await hd.group("slow", max_wait=0.3)
    agent = await hd.agent("agent-1", capacity=1, groups=("slow",))
    c0, conv0 = await hd.customer("cust-0", "slow")
    await assigned(c0, agent, conv0)
    c1, conv1 = await hd.customer("cust-1", "slow")
    await c1.position(conv1, position=1)
    await c1.event(conv1, "leave_message", reason="max_wait")
    await c1.position(conv1, position=0, backlog=True)


# -- 14. supervisors -------------------------------------------------------------------------------


async def test_supervisor_watches_whispers_and_takes_over(hd: Harness) -> None:
    agent = await hd.agent("agent-1")
    admin = await hd.connect("boss", "admin")
    customer, conv = await hd.customer("cust-1")
    await assigned(customer, agent, conv)
    info = await admin.conv_op("watch", conv=conv)
    assert info["conv"] == conv and info["agent"] == "agent-1"

    hi = await customer.send_text(conv, "Hi")
    hello = await agent.send_text(conv, "Hello")
    note = await agent.send_text(conv, "angry customer", type="note")
    for ack in (hi, hello, note):
        await admin.expect(
            lambda fr, ack=ack: fr.get("op") == "message" and fr["seq"] == ack["seq"]
        )

    before = await customer.info(conv)
    await admin.error(
        "send", "forbidden", conv=conv, client_msg_id="b1", type="text", body={"text": "hey"}
    )
    await customer.error("takeover", "forbidden", conv=conv)
    await customer.error("watch", "forbidden", conv=conv)
    await agent.error("takeover", "forbidden", conv=conv)
    await agent.error("watch", "forbidden", conv=conv)
    assert await customer.info(conv) == before

    whisper = await admin.send_text(conv, "offer 10% off", type="note")
    await agent.expect(lambda fr: is_note(fr) and fr["seq"] == whisper["seq"])
    await customer.barrier()
    assert customer.pushed(is_note) == []

    taken = await admin.conv_op("takeover", conv=conv)
    assert taken["agent"] == "boss" and taken["state"] == "assigned"
    for side in (customer, agent):
        await side.event(conv, "taken_over", state="assigned", to="boss", **{"from": "agent-1"})
    await agent.agent_frame(load=0)
    assert (await hd.loads())["agent-1"] == 0
    await admin.error("takeover", "invalid_transition", conv=conv)

    said = await admin.send_text(conv, "I am the supervisor, let me help")
    pushed = await customer.expect(
        lambda fr: fr.get("op") == "message" and fr.get("seq") == said["seq"]
    )
    assert pushed["sender"] == "boss" and pushed["sender_role"] == "admin"
    await agent.error("sync", "forbidden", conv=conv)
    assert (await admin.sync(conv))["last_seq"] == said["seq"]


async def test_unwatched_supervisor_gets_no_pushes(hd: Harness) -> None:
    agent = await hd.agent("agent-1")
    admin = await hd.connect("boss", "admin")
    customer, conv = await hd.customer("cust-1")
    await assigned(customer, agent, conv)
    await admin.conv_op("watch", conv=conv)
    await admin.conv_op("watch", conv=conv, on=False)
    await customer.send_text(conv, "Hi")
    await agent.send_text(conv, "psst", type="note")
    await admin.barrier()
    assert admin.pushed(lambda fr: fr.get("op") == "message") == []


# -- 15. satisfaction ratings ------------------------------------------------------------------------


async def test_rating_a_resolved_conversation(hd: Harness) -> None:
    agent = await hd.agent("agent-1")
    customer, conv = await hd.customer("cust-1")
    await assigned(customer, agent, conv)
    stranger = await hd.connect("cust-2")

    before = await customer.info(conv)
    await customer.error("rate", "invalid_transition", conv=conv, score=5)
    assert await customer.info(conv) == before
    await agent.conv_op("resolve", conv=conv)
    before = await customer.info(conv)
    assert "csat_score" not in before
    await customer.error("rate", "bad_frame", conv=conv, score=6)
    await customer.error("rate", "bad_frame", conv=conv, score=0)
    await stranger.error("rate", "forbidden", conv=conv, score=1)
    await agent.error("rate", "forbidden", conv=conv, score=1)
    await customer.error("rate", "not_found", conv="nope", score=1)
    assert await customer.info(conv) == before

    rated = await customer.conv_op("rate", conv=conv, score=4, comment="quick")
    assert rated["csat_score"] == 4 and rated["state"] == "resolved"
    await agent.conversation(conv, csat_score=4)
    after = await customer.info(conv)
    await customer.error("rate", "already_rated", conv=conv, score=1)
    assert await customer.info(conv) == after and after["csat_score"] == 4
    stored = await hd.stored(conv)
    assert (stored.csat_score, stored.csat_comment) == (4, "quick")


# -- 16. customer inactivity -------------------------------------------------------------------------


async def test_unanswered_agent_message_warns_then_closes(make_desk: MakeDesk) -> None:
    hd = await make_desk(inactivity_warning=0.2, inactivity_close=0.5)
    agent = await hd.agent("agent-1")
    customer, conv = await hd.customer("cust-1")
    await assigned(customer, agent, conv)
    await agent.send_text(conv, "Are you still there?")
    warning = await customer.event(conv, "inactivity_warning")
    assert warning["body"]["data"]["closes_in"] >= 0
    closed = await customer.event(conv, "closed", reason="inactivity", state="closed")
    assert closed["sender"] == "system"
    await agent.agent_frame(load=0)
    assert (await customer.info(conv))["state"] == "closed"
    page = await customer.sync(conv)
    assert events(page)[-2:] == ["inactivity_warning", "closed"]


async def test_customer_answer_resets_the_inactivity_timer(make_desk: MakeDesk) -> None:
    hd = await make_desk(inactivity_warning=0.2, inactivity_close=0.5)
    agent = await hd.agent("agent-1")
    customer, conv = await hd.customer("cust-1")
    await assigned(customer, agent, conv)
    await agent.send_text(conv, "Are you still there?")
    await customer.event(conv, "inactivity_warning")
    await customer.send_text(conv, "Yes, sorry")
    await asyncio.sleep(0.7)
    info = await customer.info(conv)
    assert info["state"] == "assigned"
    assert events(await customer.sync(conv)).count("inactivity_warning") == 1


# -- 17. labels --------------------------------------------------------------------------------------


async def test_labels(hd: Harness) -> None:
    agent = await hd.agent("agent-1")
    other = await hd.agent("agent-2")
    customer, conv = await hd.customer("cust-1")
    await assigned(customer, agent, conv)
    info = await agent.conv_op("labels", conv=conv, labels=["vip", "refund", "vip"])
    assert info["labels"] == ["refund", "vip"]
    await customer.conversation(conv, labels=["refund", "vip"])

    before = await customer.info(conv)
    await customer.error("labels", "forbidden", conv=conv, labels=["mine"])
    await other.error("labels", "forbidden", conv=conv, labels=["theirs"])
    await agent.error("labels", "bad_frame", conv=conv, labels=["has space"])
    await agent.error("labels", "bad_frame", conv=conv, labels=[f"l{i}" for i in range(21)])
    assert await customer.info(conv) == before
    assert (await customer.info(conv))["labels"] == ["refund", "vip"]

    cleared = await agent.conv_op("labels", conv=conv, labels=[])
    assert "labels" not in cleared or cleared["labels"] == []
