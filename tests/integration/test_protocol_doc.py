"""docs/protocol.md, checked against a running node by a client that knows only that page.

The client here is the ``websockets`` package (not aiohttp, not kefu.client): JSON text
frames built by hand from the documented field tables, nothing imported from kefu except
the test server and its config and token helpers. When a test here fails, either the node or
docs/protocol.md is wrong.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp  # for the REST set-up only; the WebSocket side is `websockets`
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from kefu.server import Server
from tests.conftest import make_config, token

Frame = dict[str, Any]

LISTING = {
    "id": "L-1001",
    "title": "Road bike, 54 cm",
    "price": "1200.00",
    "image_url": "https://img.example.com/l/1001.jpg",
}


def ws_url(server: Server, query: str) -> str:
    return f"ws://{server.config.host}:{server.port}/ws?{query}"


class Peer:
    """One WebSocket connection speaking JSON frames; frames not yet wanted are kept."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.inbox: list[Frame] = []

    async def send(self, frame: Frame) -> None:
        await self.ws.send(json.dumps(frame))

    async def expect(self, wanted: Callable[[Frame], bool], timeout: float = 5.0) -> Frame:
        """The first frame (kept or arriving) for which ``wanted`` is true."""
        for i, frame in enumerate(self.inbox):
            if wanted(frame):
                return self.inbox.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching frame; kept: {self.inbox}")
            raw = await asyncio.wait_for(self.ws.recv(), remaining)
            assert isinstance(raw, str), "the server sends text frames only"
            frame: Frame = json.loads(raw)
            if wanted(frame):
                return frame
            self.inbox.append(frame)

    async def op(self, op: str) -> Frame:
        return await self.expect(lambda f: f.get("op") == op)

    async def request(self, frame: Frame) -> Frame:
        """Send a frame with an ``id``; return the reply that echoes it."""
        await self.send(frame)
        return await self.expect(lambda f: "id" in f and f["id"] == frame["id"])

    async def quiet(self) -> None:
        """Assert nothing is queued for us: a ping's pong must be the next frame."""
        await self.send({"op": "ping", "id": "quiet?"})
        frame = await self.expect(lambda f: True)
        assert frame == {"op": "pong", "ts": frame["ts"], "id": "quiet?"}, frame
        assert not self.inbox, self.inbox

    async def closed(self, timeout: float = 5.0) -> tuple[list[Frame], int | None]:
        """Read until the server closes; return the frames before the close and its code."""
        frames = list(self.inbox)
        self.inbox.clear()
        try:
            while True:
                raw = await asyncio.wait_for(self.ws.recv(), timeout)
                frames.append(json.loads(raw))
        except ConnectionClosed as exc:
            return frames, None if exc.rcvd is None else exc.rcvd.code

    async def close(self) -> None:
        await self.ws.close()


async def dial(server: Server, query: str, **kwargs: Any) -> Peer:
    return Peer(await connect(ws_url(server, query), **kwargs))


async def login(server: Server, user: str, role: str, **kwargs: Any) -> Peer:
    """Connect with the token in the query string and wait for ``hello``."""
    peer = await dial(server, f"user_id={user}&token={token(user, role)}", **kwargs)
    hello = await peer.op("hello")
    assert hello["user"] == user
    assert hello["role"] == role
    return peer


def is_message(conv: str, seq: int) -> Callable[[Frame], bool]:
    return lambda f: f.get("op") == "message" and f["conv"] == conv and f["seq"] == seq


async def test_documented_session(server: Server) -> None:
    # -- §1 connecting: the agent puts the token in the query string -----------------------
    agent_ws = await connect(ws_url(server, f"user_id=agent-7&token={token('agent-7', 'agent')}"))
    extensions = agent_ws.response.headers.get("Sec-WebSocket-Extensions", "")
    assert "permessage-deflate" in extensions
    assert "server_max_window_bits=11" in extensions
    agent = Peer(agent_ws)
    hello = await agent.op("hello")
    assert hello["user"] == "agent-7"
    assert hello["role"] == "agent"
    assert hello["heartbeat"] == 30.0
    assert isinstance(hello["session"], str)
    assert hello["node"]
    assert hello["protocol"] == 1  # always present
    assert "id" not in hello

    # -- the customer authenticates with an auth frame; only auth and ping before that -----
    cust = await dial(server, "user_id=cust-42")
    early = await cust.request({"op": "sync", "id": "s0", "conv": "x"})
    assert early["op"] == "error"
    assert early["code"] == "unauthenticated"
    assert early["retryable"] is False  # always present
    assert (await cust.request({"op": "ping", "id": "p0"}))["op"] == "pong"
    await cust.send({"op": "auth", "id": "a1", "token": token("cust-42", "customer")})
    hello = await cust.op("hello")
    assert hello["user"] == "cust-42"
    assert hello["role"] == "customer"
    assert hello["protocol"] == 1
    assert "id" not in hello
    again = await cust.request({"op": "auth", "id": "a2", "token": token("cust-42", "customer")})
    assert again["op"] == "error"
    assert again["code"] == "already_authenticated"

    # -- open: the agent names the customer and is assigned at once ------------------------
    opened = await agent.request(
        {
            "op": "open",
            "id": "o1",
            "customer_id": "cust-42",
            "group": "general",
            "context_type": "listing_card",
            "context": LISTING,
        }
    )
    assert opened["op"] == "conversation"
    info = opened["conversation"]
    conv = info["conv"]
    assert info["customer"] == "cust-42"
    assert info["agent"] == "agent-7"
    assert info["state"] == "assigned"
    assert info["last_seq"] == 0
    assert info["group"] == "general"
    # the context is echoed in its canonical form: the card's default currency filled in
    assert info["context_type"] == "listing_card"
    assert info["context"] == dict(LISTING, currency="CNY")
    pushed = await cust.op("conversation")
    assert pushed == {"op": "conversation", "conversation": info}  # the push has no id

    # -- send every client message type; ack = stored; the other side gets the push --------
    sends: list[tuple[Peer, Peer, str, str, dict[str, Any]]] = [
        (cust, agent, "c-0001", "text", {"text": "Is the bike still available?"}),
        (
            agent,
            cust,
            "a-0001",
            "image",
            {"url": "https://img.example.com/u/77.jpg", "width": 1024, "height": 768},
        ),
        (
            agent,
            cust,
            "a-0002",
            "order_card",
            {
                "id": "O-9",
                "title": "Order 9",
                "price": "99.5",
                "image_url": "https://img.example.com/o/9.jpg",
                "currency": "USD",
            },
        ),
        (cust, agent, "c-0002", "listing_card", LISTING),
    ]
    acks: list[Frame] = []
    for n, (sender, receiver, cmid, kind, body) in enumerate(sends, start=1):
        ack = await sender.request(
            {"op": "send", "id": n, "conv": conv, "client_msg_id": cmid, "type": kind, "body": body}
        )
        assert ack["op"] == "ack", ack
        assert ack["conv"] == conv
        assert ack["client_msg_id"] == cmid
        assert ack["seq"] == n
        assert "duplicate" not in ack  # omitted when false
        assert len(ack["msg_id"]) == 32
        assert isinstance(ack["ts"], int)
        acks.append(ack)
        push = await receiver.expect(is_message(conv, n))
        expected_body = (
            dict(body, currency=body.get("currency", "CNY")) if "price" in body else body
        )
        assert push == {
            "op": "message",
            "conv": conv,
            "seq": n,
            "msg_id": ack["msg_id"],
            "sender": "cust-42" if sender is cust else "agent-7",
            "sender_role": "customer" if sender is cust else "agent",
            "type": kind,
            "body": expected_body,  # canonical: the card's default currency filled in
            "ts": ack["ts"],
            "client_msg_id": cmid,
        }

    # -- idempotent resend: same client_msg_id -> the original ack, duplicate, a re-push ----
    dup = await cust.request(
        {
            "op": "send",
            "id": "again",
            "conv": conv,
            "client_msg_id": "c-0001",
            "type": "text",
            "body": {"text": "Is the bike still available?"},
        }
    )
    assert dup["duplicate"] is True
    assert (dup["seq"], dup["msg_id"], dup["ts"]) == (
        acks[0]["seq"],
        acks[0]["msg_id"],
        acks[0]["ts"],
    )
    # the other side gets the message again, same seq and msg_id: deduplicate by (conv, seq)
    repush = await agent.op("message")
    assert (repush["seq"], repush["msg_id"]) == (acks[0]["seq"], acks[0]["msg_id"])
    # the same client_msg_id with another body or type: idempotency_conflict, not stored
    for n, (kind, body) in enumerate(
        [
            ("text", {"text": "Is the bike still there?"}),
            ("listing_card", LISTING),
        ]
    ):
        conflict = await cust.request(
            {
                "op": "send",
                "id": f"conflict-{n}",
                "conv": conv,
                "client_msg_id": "c-0001",
                "type": kind,
                "body": body,
            }
        )
        assert conflict["op"] == "error", conflict
        assert conflict["code"] == "idempotency_conflict"
        assert conflict["retryable"] is False
    await agent.quiet()
    # The key is scoped per sender: the agent may use the customer's client_msg_id.
    other = await agent.request(
        {
            "op": "send",
            "id": 5,
            "conv": conv,
            "client_msg_id": "c-0001",
            "type": "text",
            "body": {"text": "Yes, it is."},
        }
    )
    assert other["seq"] == 5
    assert "duplicate" not in other
    await cust.expect(is_message(conv, 5))

    # -- sync pages forward until has_more is false; seqs 1..5, no gaps --------------------
    seen: list[int] = []
    after = 0
    while True:
        page = await cust.request(
            {"op": "sync", "id": f"sync-{after}", "conv": conv, "after_seq": after, "limit": 2}
        )
        assert page["op"] == "messages"
        assert page["conv"] == conv
        assert all(m["op"] == "message" for m in page["messages"])
        seen += [m["seq"] for m in page["messages"]]
        assert page["last_seq"] == page["messages"][-1]["seq"]
        after = page["last_seq"]
        if not page["has_more"]:
            break
    assert seen == [1, 2, 3, 4, 5]
    empty = await cust.request({"op": "sync", "id": "tail", "conv": conv, "after_seq": 5})
    assert empty["messages"] == []
    assert empty["has_more"] is False
    assert "last_seq" not in empty

    # -- history pages backwards, each page ascending ---------------------------------------
    pages: list[list[int]] = []
    before: int | None = None
    while True:
        request: Frame = {"op": "history", "id": f"h-{before}", "conv": conv, "limit": 2}
        if before is not None:
            request["before_seq"] = before
        page = await agent.request(request)
        seqs = [m["seq"] for m in page["messages"]]
        pages.append(seqs)
        if not page["has_more"]:
            break
        before = seqs[0]
    assert pages == [[4, 5], [2, 3], [1]]

    # -- read: ok to the reader, a read push (capped at the last seq) to the other side ----
    ok = await cust.request({"op": "read", "id": "r1", "conv": conv, "seq": 99})
    assert ok == {"op": "ok", "id": "r1"}
    receipt = await agent.op("read")
    assert receipt == {"op": "read", "conv": conv, "user": "cust-42", "seq": 5}

    # -- typing: no reply on success; the other participant gets a push --------------------
    await cust.send({"op": "typing", "id": "t1", "conv": conv})
    await cust.quiet()
    assert await agent.op("typing") == {"op": "typing", "conv": conv, "user": "cust-42"}

    # -- ping / pong ------------------------------------------------------------------------
    pong = await agent.request({"op": "ping", "id": 4242})
    assert pong["op"] == "pong"
    assert pong["id"] == 4242
    assert isinstance(pong["ts"], int)

    # -- convs: last_seq and your own read mark ----------------------------------------------
    listed = await cust.request({"op": "convs", "id": "c1"})
    [mine] = [c for c in listed["conversations"] if c["conv"] == conv]
    assert mine["last_seq"] == 5
    assert mine["read_seq"] == 5
    assert mine["agent"] == "agent-7"
    assert mine["context_type"] == "listing_card"
    assert mine["context"] == dict(LISTING, currency="CNY")
    listed = await agent.request({"op": "convs", "id": "c2"})
    [theirs] = [c for c in listed["conversations"] if c["conv"] == conv]
    assert theirs["last_seq"] == 5
    assert "read_seq" not in theirs

    # -- error frames: documented codes, id echoed, the connection stays open --------------
    bad_type = await cust.request(
        {
            "op": "send",
            "id": "e1",
            "conv": conv,
            "client_msg_id": "c-x",
            "type": "system",
            "body": {"event": "x"},
        }
    )
    assert bad_type["op"] == "error"
    assert bad_type["code"] == "bad_frame"
    too_long = await cust.request(
        {
            "op": "send",
            "id": "e2",
            "conv": conv,
            "client_msg_id": "c-x",
            "type": "text",
            "body": {"text": "x" * 8001},
        }
    )
    assert too_long["code"] == "bad_frame"
    extra = await cust.request({"op": "ping", "id": "e3", "extra": 1})
    assert extra["code"] == "bad_frame"
    unknown = await cust.request({"op": "fly", "id": "e4"})
    assert unknown["code"] == "unknown_op"
    await cust.ws.send("not json")
    bad_json = await cust.op("error")
    assert bad_json["code"] == "bad_json"
    assert "id" not in bad_json
    missing = await cust.request({"op": "sync", "id": "e5", "conv": "no-such-conv"})
    assert missing["code"] == "not_found"
    stranger = await login(server, "cust-9", "customer")
    denied = await stranger.request({"op": "sync", "id": "e6", "conv": conv})
    assert denied["code"] == "forbidden"
    assert denied["retryable"] is False
    not_theirs = await stranger.request({"op": "open", "id": "e7", "customer_id": "cust-42"})
    assert not_theirs["code"] == "forbidden"
    await stranger.close()
    no_customer = await agent.request({"op": "open", "id": "e8"})
    assert no_customer["code"] == "bad_frame"
    await cust.quiet()

    # -- §13 reconnect: send, drop before reading the ack, catch up, resend the same id ----
    await cust.send(
        {
            "op": "send",
            "id": "lost",
            "conv": conv,
            "client_msg_id": "c-0003",
            "type": "text",
            "body": {"text": "Can you ship it?"},
        }
    )
    await cust.close()
    last_seen = 5
    away = await agent.request(
        {
            "op": "send",
            "id": 6,
            "conv": conv,
            "client_msg_id": "a-0003",
            "type": "text",
            "body": {"text": "Anything else?"},
        }
    )
    assert away["op"] == "ack"

    cust = await dial(
        server,
        "user_id=cust-42",
        additional_headers={"Authorization": f"Bearer {token('cust-42', 'customer')}"},
    )
    assert (await cust.op("hello"))["user"] == "cust-42"
    listed = await cust.request({"op": "convs", "id": "after-reconnect"})
    [mine] = [c for c in listed["conversations"] if c["conv"] == conv]
    assert mine["last_seq"] >= 6
    messages: dict[tuple[str, int], Frame] = {}
    after = last_seen
    while True:
        page = await cust.request(
            {"op": "sync", "id": f"resync-{after}", "conv": conv, "after_seq": after}
        )
        for m in page["messages"]:
            messages[(m["conv"], m["seq"])] = m  # dedupe by (conv, seq)
        if not page["has_more"]:
            break
        after = page["last_seq"]
    resent = await cust.request(
        {
            "op": "send",
            "id": "resent",
            "conv": conv,
            "client_msg_id": "c-0003",
            "type": "text",
            "body": {"text": "Can you ship it?"},
        }
    )
    assert resent["op"] == "ack"  # stored before the drop (duplicate) or now: either way once
    final = await cust.request({"op": "sync", "id": "final", "conv": conv, "after_seq": 0})
    seqs = [m["seq"] for m in final["messages"]]
    assert seqs == list(range(1, len(seqs) + 1))
    assert [m["client_msg_id"] for m in final["messages"]].count("c-0003") == 1
    assert resent["seq"] in seqs
    assert away["seq"] in seqs
    assert resent.get("duplicate", False) == (resent["seq"] < away["seq"])
    await cust.close()
    await agent.close()


@pytest.mark.parametrize(
    ("query", "code", "close"),
    [
        ("user_id=u1&token=not-a-jwt", "invalid_token", 4500),
        (f"user_id=u1&token={token('u1', 'customer', ttl=-60)}", "token_expired", 4501),
        (f"user_id=u2&token={token('u1', 'customer')}", "user_mismatch", 4502),
        (f"token={token('u1', 'customer')}", "user_mismatch", 4502),
    ],
)
async def test_refused_tokens_get_error_then_close(
    server: Server, query: str, code: str, close: int
) -> None:
    peer = await dial(server, query)
    frames, got = await peer.closed()
    assert [f["op"] for f in frames] == ["error"]
    assert frames[0]["code"] == code
    assert frames[0]["retryable"] is False
    assert got == close


async def test_auth_frame_failure_echoes_the_id_then_closes(server: Server) -> None:
    peer = await dial(server, "user_id=u1")
    await peer.send({"op": "auth", "id": "a1", "token": token("someone-else", "agent")})
    frames, code = await peer.closed()
    assert frames == [
        {
            "op": "error",
            "code": "user_mismatch",
            "message": frames[0]["message"],
            "retryable": False,
            "id": "a1",
        }
    ]
    assert code == 4502


async def test_invalid_utf8_is_bad_json_then_1007(server: Server) -> None:
    peer = await login(server, "utf-1", "customer")
    await peer.ws.send(b'{"op":"ping","id":"\xed\xa0\x80"}', text=True)  # not UTF-8
    frames, code = await peer.closed()
    assert frames == [
        {
            "op": "error",
            "code": "bad_json",
            "message": "text frame is not valid UTF-8",
            "retryable": False,
        }
    ]
    assert code == 1007


async def test_deeply_nested_json_is_bad_frame(server: Server) -> None:
    peer = await login(server, "deep-1", "customer")
    await peer.ws.send('{"op":"ping","id":' + "[" * 3000 + "]" * 3000 + "}")
    error = await peer.op("error")
    assert error["code"] == "bad_frame"
    await peer.quiet()  # the connection stays open


async def test_binary_frame_is_bad_frame_then_1003(server: Server) -> None:
    peer = await login(server, "bin-1", "customer")
    await peer.ws.send(b"\x00\x01")
    frames, code = await peer.closed()
    assert [f["code"] for f in frames] == ["bad_frame"]
    assert code == 1003


async def test_frame_limit_64_kib(server: Server) -> None:
    peer = await login(server, "big-1", "customer")
    padding = "x" * (64 * 1024 - len('{"op":"ping","id":""}'))
    exact = '{"op":"ping","id":"' + padding + '"}'
    assert len(exact.encode()) == 64 * 1024
    await peer.ws.send(exact)  # accepted: the id is too long, so a bad_frame error, no id
    error = await peer.op("error")
    assert error["code"] == "bad_frame"
    assert "id" not in error
    await peer.ws.send(exact + " ")  # one byte over: closed 1009 without an error frame
    frames, code = await peer.closed()
    assert frames == []
    assert code == 1009


async def test_too_many_connections_per_user_4504(server: Server) -> None:
    peers = [await login(server, "many-1", "agent") for _ in range(10)]
    eleventh = await dial(server, f"user_id=many-1&token={token('many-1', 'agent')}")
    frames, code = await eleventh.closed()
    assert [f["code"] for f in frames] == ["too_many_connections"]
    assert frames[0]["retryable"] is False
    assert code == 4504
    await peers[0].close()
    await asyncio.sleep(0.2)
    peers[0] = await login(server, "many-1", "agent")  # a slot is free again
    for peer in peers:
        await peer.close()


async def test_node_full_4004(tmp_path: Path) -> None:
    small = Server(make_config(tmp_path / "small", max_connections=1))
    await small.start()
    try:
        first = await login(small, "full-1", "customer")
        over = await dial(small, f"user_id=full-2&token={token('full-2', 'customer')}")
        frames, code = await over.closed()
        assert [(f["op"], f["code"], f["retryable"]) for f in frames] == [
            ("error", "node_full", True)
        ]
        assert code == 4004
        await first.quiet()
        await first.close()
        deadline = time.monotonic() + 5
        while True:  # reconnect later, with backoff
            later = await dial(small, f"user_id=full-2&token={token('full-2', 'customer')}")
            frame = await later.expect(lambda f: True)
            if frame["op"] == "hello":
                break
            assert frame["code"] == "node_full"
            assert time.monotonic() < deadline, "the slot was not freed"
            await later.closed()
            await asyncio.sleep(0.05)
        await later.close()
    finally:
        await small.stop()


async def test_rate_limit_then_flood_close_4003(server: Server) -> None:
    peer = await login(server, "fast-1", "customer")
    for n in range(60):  # the burst is 40
        await peer.send({"op": "ping", "id": n})
    replies = [await peer.expect(lambda f, n=n: f.get("id") == n) for n in range(60)]
    limited = [r for r in replies if r["op"] == "error"]
    assert limited, "60 frames at once must pass the burst of 40"
    assert {r["code"] for r in limited} == {"rate_limited"}
    assert all(r["retryable"] is True and 0 < r["retry_after"] <= 1 for r in limited)
    await asyncio.sleep(limited[-1]["retry_after"] + 0.1)
    assert (await peer.request({"op": "ping", "id": "later"}))["op"] == "pong"

    try:
        for n in range(3000):
            await peer.send({"op": "ping", "id": n})
    except ConnectionClosed:
        pass
    frames, code = await peer.closed()
    assert code == 4003
    assert frames[-1]["op"] == "error"
    assert frames[-1]["code"] == "rate_limited"


async def test_drain_sends_notice_then_1012(server: Server) -> None:
    peer = await login(server, "drain-1", "customer")
    stopping = asyncio.create_task(server.stop())
    frames, code = await peer.closed()
    await stopping
    assert frames == [{"op": "notice", "code": "draining", "text": frames[0]["text"]}]
    assert code == 1012


async def test_documented_help_desk_session(server: Server) -> None:
    """docs/operations.md (REST set-up) and docs/protocol.md section 15, end to end."""
    admin = {"Authorization": f"Bearer {token('boss', 'admin')}"}
    async with aiohttp.ClientSession() as http:
        created = await http.post(
            f"{server.url}/api/v1/agents",
            headers=admin,
            json={"id": "agent-7", "name": "Li Wei", "groups": ["general"], "capacity": 8},
        )
        assert created.status == 201, await created.text()

    agent = await login(server, "agent-7", "agent")
    status = await agent.request({"op": "status", "id": 1, "status": "online"})
    assert status["op"] == "agent" and status["status"] == "online" and status["capacity"] == 8

    cust = await login(server, "cust-42", "customer")
    opened = await cust.request({"op": "open", "id": "o1"})
    assert opened["conversation"]["state"] == "queued"
    conv = opened["conversation"]["conv"]
    queued = await cust.expect(is_message(conv, 1))
    assert queued["type"] == "system" and queued["body"]["event"] == "queued"
    assigned = await cust.expect(is_message(conv, 2))
    assert assigned["body"]["event"] == "assigned"
    assert assigned["body"]["data"]["agent"] == "agent-7"
    assert assigned["body"]["data"]["state"] == "assigned"
    pushed = await agent.expect(
        lambda f: f.get("op") == "conversation" and f["conversation"]["conv"] == conv
    )
    assert pushed["conversation"]["state"] == "assigned"

    accepted = await agent.request({"op": "accept", "id": 2, "conv": conv})
    assert accepted["conversation"]["accepted"] is True
    note = await agent.request(
        {
            "op": "send",
            "id": 3,
            "conv": conv,
            "client_msg_id": "n1",
            "type": "note",
            "body": {"text": "VIP buyer"},
        }
    )
    assert note["op"] == "ack"
    refused = await cust.request(
        {
            "op": "send",
            "id": "n",
            "conv": conv,
            "client_msg_id": "n2",
            "type": "note",
            "body": {"text": "me too"},
        }
    )
    assert refused["op"] == "error" and refused["code"] == "forbidden"
    resolved = await agent.request({"op": "resolve", "id": 4, "conv": conv})
    assert resolved["conversation"]["state"] == "resolved"

    # The customer never sees the note, yet their sync page's last_seq covers it.
    page = await cust.request({"op": "sync", "id": "s", "conv": conv, "after_seq": 0})
    assert all(m["type"] != "note" for m in page["messages"])
    assert page["last_seq"] >= note["seq"]
    events = [m["body"]["event"] for m in page["messages"] if m["type"] == "system"]
    assert events == ["queued", "assigned", "accepted", "resolved"]

    rated = await cust.request(
        {"op": "rate", "id": "r", "conv": conv, "score": 5, "comment": "quick"}
    )
    assert rated["conversation"]["csat_score"] == 5
    again = await cust.request({"op": "rate", "id": "r2", "conv": conv, "score": 4})
    assert again["code"] == "already_rated" and again["retryable"] is False
    await agent.close()
    await cust.close()
