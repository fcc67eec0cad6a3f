"""Bad input over real sockets.

Each case checks three things: the misbehaving client gets its documented error frame or
close code; a well-behaved pair of clients (the :class:`Witness`) keeps sending, getting
acks and receiving pushes during and after; and nothing acknowledged is lost (a sync at
the end returns every acked seq, gap-free).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import string
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kefu.errors import CloseCode
from kefu.server import Server
from tests.conftest import Connect, RawClient, make_config, open_conversation, token

# -- helpers -------------------------------------------------------------------------------


async def dial(
    http: aiohttp.ClientSession,
    url: str,
    user: str | None,
    role: str = "customer",
    *,
    tok: str | None = "issue",
    hello: bool = True,
    **kwargs: Any,
) -> RawClient:
    """Open a WebSocket to ``url``; ``tok="issue"`` signs a valid token, None sends none."""
    params = []
    if user is not None:
        params.append(f"user_id={user}")
    if tok == "issue":
        assert user is not None
        tok = token(user, role)
    if tok is not None:
        params.append(f"token={tok}")
    client = RawClient(await http.ws_connect(f"{url}/ws?{'&'.join(params)}", **kwargs))
    if hello:
        frame = await client.recv()
        assert frame["op"] == "hello", frame
    return client


async def expect_refused(client: RawClient, code: str, close: CloseCode) -> dict[str, Any]:
    """The server sends one error frame with ``code``, then closes with ``close``."""
    frame = await client.recv()
    assert frame["op"] == "error", frame
    assert frame["code"] == code, frame
    assert await client.closed() == close
    return frame


async def still_serving(client: RawClient) -> None:
    reply = await client.request({"op": "ping", "id": "alive?"})
    assert reply["op"] == "pong", reply


def text_send(conv: str, n: int | str, text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {
        "op": "send",
        "id": f"req-{n}",
        "conv": conv,
        "client_msg_id": f"cm-{n}",
        "type": "text",
        "body": {"text": text},
        **extra,
    }


async def sync_all(client: RawClient, conv: str, *, limit: int = 1000) -> list[dict[str, Any]]:
    """Every message of ``conv`` after seq 0, following has_more."""
    messages: list[dict[str, Any]] = []
    after = 0
    for page in range(1000):
        reply = await client.request(
            {"op": "sync", "id": f"sync-{page}", "conv": conv, "after_seq": after, "limit": limit}
        )
        assert reply["op"] == "messages", reply
        messages.extend(reply["messages"])
        if not reply["has_more"]:
            return messages
        after = reply["last_seq"]
    raise AssertionError("sync never ended")


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def alg_none_token(user: str, role: str = "customer") -> str:
    now = int(time.time())
    claims = {"sub": user, "role": role, "iat": now, "exp": now + 3600}
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."


def forged_token(user: str) -> str:
    head, body, sig = token(user).split(".")
    evil = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    evil["role"] = "admin"
    return f"{head}.{b64(evil)}.{sig}"


class Witness:
    """A well-behaved agent and customer chatting in the background.

    The customer sends a message every ``interval`` seconds and waits for its ack; the agent
    must receive each one as a push. :meth:`progressed` waits for fresh acks (proof that
    the node still serves others); :meth:`finish` stops, then checks that a sync returns
    every acked seq with no gap.
    """

    def __init__(self, http: aiohttp.ClientSession, url: str, *, interval: float = 0.06) -> None:
        self.http = http
        self.url = url
        self.interval = interval
        self.name = f"w{random.randrange(10**9)}"
        self.acked: list[int] = []
        self.pushed: list[int] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.conv = ""

    async def start(self) -> None:
        self.agent = await dial(self.http, self.url, f"{self.name}-agent", "agent")
        self.customer = await dial(self.http, self.url, f"{self.name}-cust")
        self.conv = await open_conversation(self.agent, f"{self.name}-cust")
        await self.customer.recv_op("conversation")
        self._task = asyncio.get_running_loop().create_task(self._run())
        await self.progressed(1)

    async def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            ack = await self.customer.request(text_send(self.conv, n, f"witness {n}"))
            assert ack["op"] == "ack", ack
            self.acked.append(ack["seq"])
            push = await self.agent.recv_op("message")
            assert push["seq"] == ack["seq"], (push, ack)
            self.pushed.append(push["seq"])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)

    @property
    def count(self) -> int:
        return len(self.acked)

    async def progressed(
        self, n: int = 2, *, since: int | None = None, timeout: float = 5.0
    ) -> None:
        """Wait until ``n`` more messages were acked and pushed (since ``since``)."""
        base = self.count if since is None else since
        deadline = time.monotonic() + timeout
        while len(self.pushed) < base + n:
            assert self._task is not None
            if self._task.done():
                self._task.result()  # raise what broke the witness
                raise AssertionError("witness stopped")
            assert time.monotonic() < deadline, f"witness stuck at {self.count} acks"
            await asyncio.sleep(0.01)

    async def finish(self) -> None:
        await self.progressed(2)
        self._stop.set()
        assert self._task is not None
        await asyncio.wait_for(self._task, 10)
        stored = [m["seq"] for m in await sync_all(self.agent, self.conv)]
        assert stored == list(range(1, len(stored) + 1)), "gap or disorder in seqs"
        assert stored == self.acked, "an acknowledged message is missing"
        assert self.pushed == self.acked
        await self.agent.close()
        await self.customer.close()


@asynccontextmanager
async def witnessed(
    http: aiohttp.ClientSession, url: str, *, interval: float = 0.06
) -> AsyncIterator[Witness]:
    witness = Witness(http, url, interval=interval)
    await witness.start()
    try:
        yield witness
    except BaseException:
        witness._stop.set()
        if witness._task is not None:
            witness._task.cancel()
        raise
    await witness.finish()


@asynccontextmanager
async def custom_server(tmp_path: Path, **settings: Any) -> AsyncIterator[Server]:
    srv = Server(make_config(tmp_path / "custom", **settings))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def chat(
    http: aiohttp.ClientSession, url: str, name: str
) -> tuple[RawClient, RawClient, str]:
    """An agent and a customer with an open conversation: (agent, customer, conv)."""
    agent = await dial(http, url, f"{name}-agent", "agent")
    customer = await dial(http, url, f"{name}-cust")
    conv = await open_conversation(agent, f"{name}-cust")
    await customer.recv_op("conversation")
    return agent, customer, conv


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# -- malformed frames ----------------------------------------------------------------------


async def test_invalid_json(server: Server, http: aiohttp.ClientSession, connect: Connect) -> None:
    async with witnessed(http, server.url) as w:
        client = await connect("bj-1")
        for data in ("not json", "{", '{"op":"ping"', "", "{'op': 'ping'}"):
            mark = w.count
            await client.ws.send_str(data)
            frame = await client.recv()
            assert frame["op"] == "error", frame
            assert frame["code"] == "bad_json", frame
            assert frame["retryable"] is False  # always present
            await w.progressed(1, since=mark)
        await still_serving(client)


async def test_invalid_utf8_text_frame(
    server: Server, http: aiohttp.ClientSession, connect: Connect
) -> None:
    """A text frame that is not UTF-8: bad_json, then close 1007 (do not reconnect)."""
    async with witnessed(http, server.url) as w:
        client = await connect("utf-1")
        mark = w.count
        await client.ws.send_frame(b'{"op":"ping","id":"\xed\xa0\x80"}', aiohttp.WSMsgType.TEXT)
        frame = await expect_refused(client, "bad_json", CloseCode.INVALID_PAYLOAD)
        assert frame["message"] == "text frame is not valid UTF-8", frame
        assert frame["retryable"] is False
        assert "id" not in frame
        assert not CloseCode.INVALID_PAYLOAD.reconnect
        await w.progressed(1, since=mark)
        again = await connect("utf-1")  # the user may connect again with a fixed client
        await still_serving(again)


async def test_deeply_nested_json(
    server: Server, http: aiohttp.ClientSession, connect: Connect
) -> None:
    """Frames of nested arrays get bad_frame; the decoder must not crash."""
    async with witnessed(http, server.url) as w:
        client = await connect("deep-1")
        mark = w.count
        deep_id = '{"op":"ping","id":' + "[" * 3000 + "]" * 3000 + "}"
        deep_body = json.dumps(text_send("c", "deep")).replace(
            '{"text": "hi"}', "[" * 20000 + "]" * 20000
        )
        assert len(deep_body) < 64 * 1024
        for data in (deep_id, deep_body):
            await client.ws.send_str(data)
            frame = await client.recv()
            assert frame["op"] == "error", frame
            assert frame["code"] == "bad_frame", frame
            assert frame["retryable"] is False
        await still_serving(client)
        await w.progressed(1, since=mark)


async def test_unknown_op(server: Server, http: aiohttp.ClientSession, connect: Connect) -> None:
    async with witnessed(http, server.url) as w:
        client = await connect("uo-1")
        for op in ("bogus", "PING", "hello"):
            mark = w.count
            reply = await client.request({"op": op, "id": f"u-{op}"})
            assert reply["op"] == "error", reply
            assert reply["code"] == "unknown_op", reply
            await w.progressed(1, since=mark)
        await still_serving(client)


@pytest.mark.parametrize(
    "frame",
    [
        {"id": "f0"},  # no op
        {"op": 5, "id": "f1"},
        {"op": "sync", "id": "f2"},  # conv missing
        {"op": "sync", "id": "f3", "conv": 12},
        {"op": "sync", "id": "f4", "conv": "c", "after_seq": -1},
        {"op": "read", "id": "f5", "conv": "c", "seq": "1"},
        {"op": "send", "id": "f6", "conv": "c", "type": "text", "body": {"text": "x"}},
        {
            "op": "send",
            "id": "f7",
            "conv": "c",
            "client_msg_id": "m",
            "type": "text",
            "body": {"text": ""},
        },
        {
            "op": "send",
            "id": "f8",
            "conv": "c",
            "client_msg_id": "m",
            "type": "system",
            "body": {"event": "x"},
        },
        {
            "op": "send",
            "id": "f9",
            "conv": "c",
            "client_msg_id": "m",
            "type": "image",
            "body": {"url": "ftp://x/y.png", "width": 1, "height": 1},
        },
        {
            "op": "send",
            "id": "f10",
            "conv": "c",
            "client_msg_id": "m",
            "type": "order_card",
            "body": {"id": "o", "title": "t", "price": "1.234", "image_url": "https://x/y.png"},
        },
        {"op": "ping", "id": "f11", "extra": True},
        {"op": "open", "id": "f12", "customer_id": 3},
    ],
    ids=lambda fr: fr["id"],
)
async def test_missing_or_mistyped_fields(
    server: Server, http: aiohttp.ClientSession, connect: Connect, frame: dict[str, Any]
) -> None:
    async with witnessed(http, server.url) as w:
        client = await connect("mf-1")
        mark = w.count
        reply = await client.request(frame)
        assert reply["op"] == "error", reply
        assert reply["code"] == "bad_frame", reply
        assert reply["id"] == frame["id"]
        await w.progressed(1, since=mark)
        await still_serving(client)


async def test_too_long_text_body(
    server: Server, http: aiohttp.ClientSession, connect: Connect
) -> None:
    limit = server.config.limits.max_body_chars
    async with witnessed(http, server.url):
        agent = await connect("tl-agent", "agent")
        conv = await open_conversation(agent, "tl-cust")
        reply = await agent.request(text_send(conv, 1, "x" * (limit + 1)))
        assert reply["code"] == "bad_frame", reply
        ack = await agent.request(text_send(conv, 2, "x" * limit))
        assert ack["op"] == "ack", ack
        assert ack["seq"] == 1, ack


async def test_oversize_frame_closes_1009(
    server: Server, http: aiohttp.ClientSession, connect: Connect
) -> None:
    async with witnessed(http, server.url) as w:
        agent, customer, conv = await chat(http, server.url, "big")
        ack = await customer.request(text_send(conv, 1, "before"))
        assert ack["op"] == "ack"
        mark = w.count
        await customer.ws.send_str(json.dumps(text_send(conv, 2, "x" * (65 * 1024))))
        assert await customer.closed() == CloseCode.MESSAGE_TOO_BIG
        await w.progressed(2, since=mark)
        again = await dial(http, server.url, "big-cust")
        assert [m["seq"] for m in await sync_all(again, conv)] == [1]
        await still_serving(agent)


async def test_binary_frame_closes_1003(
    server: Server, http: aiohttp.ClientSession, connect: Connect
) -> None:
    async with witnessed(http, server.url) as w:
        _agent, customer, conv = await chat(http, server.url, "bin")
        assert (await customer.request(text_send(conv, 1)))["op"] == "ack"
        mark = w.count
        await customer.ws.send_bytes(json.dumps(text_send(conv, 2)).encode())
        await expect_refused(customer, "bad_frame", CloseCode.UNSUPPORTED_DATA)
        await w.progressed(2, since=mark)
        again = await dial(http, server.url, "bin-cust")
        assert [m["seq"] for m in await sync_all(again, conv)] == [1]


# -- authentication ------------------------------------------------------------------------


async def test_expired_token_closes_4501(server: Server, http: aiohttp.ClientSession) -> None:
    async with witnessed(http, server.url) as w:
        mark = w.count
        client = await dial(http, server.url, "exp-1", tok=token("exp-1", ttl=-60), hello=False)
        await expect_refused(client, "token_expired", CloseCode.TOKEN_EXPIRED)
        await w.progressed(1, since=mark)


@pytest.mark.parametrize("kind", ["forged", "alg_none", "wrong_secret", "garbage"])
async def test_bad_token_closes_4500(
    server: Server, http: aiohttp.ClientSession, kind: str
) -> None:
    from kefu.auth import issue_token

    toks = {
        "forged": forged_token("bt-1"),
        "alg_none": alg_none_token("bt-1", "admin"),
        "wrong_secret": issue_token("not-the-secret-0123456789-0123456789", "bt-1", "admin"),
        "garbage": "not.a.jwt",
    }
    async with witnessed(http, server.url) as w:
        mark = w.count
        client = await dial(http, server.url, "bt-1", tok=toks[kind], hello=False)
        await expect_refused(client, "invalid_token", CloseCode.INVALID_TOKEN)
        await w.progressed(1, since=mark)


async def test_user_id_not_matching_token_closes_4502(
    server: Server, http: aiohttp.ClientSession
) -> None:
    async with witnessed(http, server.url) as w:
        mark = w.count
        client = await dial(http, server.url, "victim", tok=token("mallory"), hello=False)
        await expect_refused(client, "user_mismatch", CloseCode.USER_MISMATCH)
        await w.progressed(1, since=mark)


async def test_missing_user_id_closes_4502(server: Server, http: aiohttp.ClientSession) -> None:
    async with witnessed(http, server.url) as w:
        mark = w.count
        client = await dial(http, server.url, None, tok=token("anon"), hello=False)
        await expect_refused(client, "user_mismatch", CloseCode.USER_MISMATCH)
        await w.progressed(1, since=mark)


async def test_token_in_first_frame(server: Server, http: aiohttp.ClientSession) -> None:
    async with witnessed(http, server.url):
        client = await dial(http, server.url, "ff-1", tok=None, hello=False)
        pong = await client.request({"op": "ping", "id": "p"})  # allowed before auth
        assert pong["op"] == "pong"
        early = await client.request({"op": "convs", "id": "early"})
        assert early["code"] == "unauthenticated", early
        await client.send({"op": "auth", "id": "a1", "token": token("ff-1")})
        hello = await client.recv()
        assert hello["op"] == "hello", hello
        assert hello["user"] == "ff-1", hello
        again = await client.request({"op": "auth", "id": "a2", "token": token("ff-1")})
        assert again["code"] == "already_authenticated", again
        assert (await client.request({"op": "convs", "id": "late"}))["op"] == "conversations"


async def test_bearer_header(server: Server, http: aiohttp.ClientSession) -> None:
    client = await dial(
        http, server.url, "hdr-1", tok=None, headers={"Authorization": f"Bearer {token('hdr-1')}"}
    )
    await still_serving(client)


@pytest.mark.parametrize(
    ("make_token", "code", "close"),
    [
        (lambda: token("fa-1", ttl=-60), "token_expired", CloseCode.TOKEN_EXPIRED),
        (lambda: alg_none_token("fa-1"), "invalid_token", CloseCode.INVALID_TOKEN),
        (lambda: token("someone-else"), "user_mismatch", CloseCode.USER_MISMATCH),
    ],
    ids=["expired", "alg_none", "mismatch"],
)
async def test_bad_token_in_first_frame(
    server: Server, http: aiohttp.ClientSession, make_token: Any, code: str, close: CloseCode
) -> None:
    async with witnessed(http, server.url):
        client = await dial(http, server.url, "fa-1", tok=None, hello=False)
        await client.send({"op": "auth", "id": "a", "token": make_token()})
        frame = await expect_refused(client, code, close)
        assert frame["id"] == "a"


async def test_auth_timeout_closes_4002(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with custom_server(tmp_path, auth_timeout=0.5) as srv, witnessed(http, srv.url) as w:
        mark = w.count
        started = time.monotonic()
        idle = await dial(http, srv.url, "to-1", tok=None, hello=False)
        late = await dial(http, srv.url, "to-2", tok=None, hello=False)
        await late.send({"op": "auth", "token": token("to-2")})
        assert (await late.recv())["op"] == "hello"
        assert await idle.closed() == CloseCode.AUTH_TIMEOUT
        assert 0.4 < time.monotonic() - started < 3.0
        await w.progressed(1, since=mark)
        await still_serving(late)  # authenticated in time: not closed


# -- authorisation -------------------------------------------------------------------------


async def test_customer_cannot_reach_another_customers_conversation(
    server: Server, http: aiohttp.ClientSession
) -> None:
    async with witnessed(http, server.url) as w:
        agent, owner, conv = await chat(http, server.url, "own")
        assert (await owner.request(text_send(conv, 1, "mine")))["op"] == "ack"
        await agent.recv_op("message")
        intruder = await dial(http, server.url, "intruder")
        other_agent = await dial(http, server.url, "other-agent", "agent")
        mark = w.count
        requests = [
            text_send(conv, "x", "hijack"),
            {"op": "sync", "id": "s", "conv": conv},
            {"op": "history", "id": "h", "conv": conv},
            {"op": "read", "id": "r", "conv": conv, "seq": 1},
            {"op": "typing", "id": "t", "conv": conv},
        ]
        for who in (intruder, other_agent):
            for req in requests:
                reply = await who.request(req)
                assert reply["op"] == "error", (req, reply)
                assert reply["code"] == "forbidden", (req, reply)
        await w.progressed(1, since=mark)
        # nothing was stored or pushed by the intruders
        assert [m["body"] for m in await sync_all(owner, conv)] == [{"text": "mine"}]
        assert (await owner.request({"op": "ping", "id": "p"}))["op"] == "pong"
        listed = await intruder.request({"op": "convs", "id": "l"})
        assert listed["conversations"] == []


async def test_customer_cannot_open_for_another(
    server: Server, http: aiohttp.ClientSession
) -> None:
    async with witnessed(http, server.url):
        client = await dial(http, server.url, "op-1")
        reply = await client.request({"op": "open", "id": "o", "customer_id": "op-2"})
        assert reply["op"] == "error", reply
        assert reply["code"] == "forbidden", reply
        own = await client.request({"op": "open", "id": "o2", "customer_id": "op-1"})
        assert own["op"] == "conversation"
        assert own["conversation"]["customer"] == "op-1"
        victim = await dial(http, server.url, "op-2")
        assert (await victim.request({"op": "convs", "id": "c"}))["conversations"] == []


async def test_unknown_conversation_not_found(server: Server, http: aiohttp.ClientSession) -> None:
    async with witnessed(http, server.url):
        for who in (
            await dial(http, server.url, "nf-1"),
            await dial(http, server.url, "nf-a", "admin"),
        ):
            for req in (
                text_send("no-such-conv", 1),
                {"op": "sync", "id": "s", "conv": "no-such-conv"},
                {"op": "history", "id": "h", "conv": "no-such-conv"},
                {"op": "read", "id": "r", "conv": "no-such-conv", "seq": 1},
            ):
                reply = await who.request(req)
                assert reply["op"] == "error", (req, reply)
                assert reply["code"] == "not_found", (req, reply)


# -- limits --------------------------------------------------------------------------------


async def test_rate_limit_then_flood_close_4003(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    settings = {"rate_per_second": 5.0, "rate_burst": 5, "rate_flood_factor": 2.0}
    async with (
        custom_server(tmp_path, **settings) as srv,
        witnessed(http, srv.url, interval=0.25) as w,
    ):
        _agent, customer, conv = await chat(http, srv.url, "fl")
        acks = [await customer.request(text_send(conv, i)) for i in (1, 2)]
        assert [a["seq"] for a in acks] == [1, 2]
        # merely fast: refused with retry_after, then served once it waited
        fast = await dial(http, srv.url, "fast")
        for i in range(5):
            await fast.send({"op": "ping", "id": i})
        await fast.send({"op": "ping", "id": "over"})
        replies = [await fast.recv() for _ in range(6)]
        assert [r["op"] for r in replies[:5]] == ["pong"] * 5
        refused = replies[5]
        assert refused["op"] == "error", refused
        assert refused["code"] == "rate_limited", refused
        assert refused["id"] == "over"
        assert refused["retryable"] is True
        assert 0 < refused["retry_after"] <= 0.2 + 1e-6
        await asyncio.sleep(refused["retry_after"])
        assert (await fast.request({"op": "ping", "id": "after"}))["op"] == "pong"
        # persistent flood: rate_limited errors, then 4003
        mark = w.count
        for i in range(40):
            await customer.send({"op": "ping", "id": f"f{i}"})
        errors = 0
        while True:
            msg = await customer.ws.receive(timeout=5)
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            frame = json.loads(msg.data)
            if frame["op"] == "error":
                assert frame["code"] == "rate_limited", frame
                errors += 1
        assert customer.ws.close_code == CloseCode.RATE_FLOOD
        assert errors >= 2
        await w.progressed(1, since=mark)
        again = await dial(http, srv.url, "fl-cust")
        assert [m["seq"] for m in await sync_all(again, conv)] == [1, 2]
        await asyncio.sleep(0.2)  # one token back
        await still_serving(fast)


async def test_too_many_connections_per_user_4504(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with (
        custom_server(tmp_path, max_connections_per_user=2) as srv,
        witnessed(http, srv.url) as w,
    ):
        first = await dial(http, srv.url, "many")
        second = await dial(http, srv.url, "many")
        mark = w.count
        third = await dial(http, srv.url, "many", hello=False)
        refused = await expect_refused(
            third, "too_many_connections", CloseCode.TOO_MANY_CONNECTIONS
        )
        assert refused["retryable"] is False
        await w.progressed(1, since=mark)
        await still_serving(first)
        await still_serving(second)
        await first.close()
        await wait_for(lambda: srv.node.hub.count("many") == 1)
        fourth = await dial(http, srv.url, "many")
        await still_serving(fourth)
        assert srv.node.hub.count("many") == 2


async def test_node_full_4004(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """max_connections counts every socket: the one over it gets node_full, then 4004."""
    async with custom_server(tmp_path, max_connections=1) as srv:
        first = await dial(http, srv.url, "full-1")
        for who, tok in (("full-2", "issue"), ("full-3", None)):  # with and without a token
            over = await dial(http, srv.url, who, tok=tok, hello=False)
            refused = await expect_refused(over, "node_full", CloseCode.NODE_FULL)
            assert refused["retryable"] is True
            assert "id" not in refused
        assert CloseCode.NODE_FULL.reconnect
        await still_serving(first)
        await first.close()
        await wait_for(lambda: not srv.node.gateway.sessions)
        later = await dial(http, srv.url, "full-2")  # a slot is free again
        await still_serving(later)


async def test_node_full_comes_before_the_open_file_limit(
    tmp_path: Path, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_connections above what the open-file limit allows is held below it: the client
    past it gets the documented node_full/4004, not a reset from an exhausted process."""
    import kefu.gateway

    monkeypatch.setattr(kefu.gateway, "file_limit_cap", lambda: 1)
    async with custom_server(tmp_path, max_connections=20_000) as srv:
        assert srv.node.gateway.max_connections == 1
        first = await dial(http, srv.url, "cap-1")
        over = await dial(http, srv.url, "cap-2", hello=False)
        await expect_refused(over, "node_full", CloseCode.NODE_FULL)
        await still_serving(first)
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY:  # the real cap leaves the reserve free
        monkeypatch.undo()
        assert kefu.gateway.file_limit_cap() == hard - kefu.gateway.FD_RESERVE


async def test_slow_consumer_closed_4001_and_resyncs(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    settings = {
        "send_queue_frames": 64,
        "send_queue_soft_frames": 8,
        "send_queue_bytes": 256 * 1024,
        "rate_per_second": 100_000.0,
        "rate_burst": 100_000,
    }
    async with custom_server(tmp_path, **settings) as srv, witnessed(http, srv.url) as w:
        limit = srv.config.limits.max_body_chars
        agent, customer, conv = await chat(http, srv.url, "slow")
        # the agent's second device never reads its socket
        before = {s.id for s in srv.node.hub.sessions("slow-agent")}
        stuck = await dial(http, srv.url, "slow-agent", "agent")
        (stuck_session,) = [s for s in srv.node.hub.sessions("slow-agent") if s.id not in before]
        seen: list[int] = []

        async def read_agent() -> None:
            while True:
                seen.append((await agent.recv_op("message"))["seq"])

        reader = asyncio.get_running_loop().create_task(read_agent())
        text = "".join(random.choices(string.ascii_letters + " ", k=limit - 10))
        acked: list[int] = []
        mark = w.count
        try:
            for n in range(1, 5000):
                ack = await customer.request(text_send(conv, n, text))
                assert ack["op"] == "ack", ack
                acked.append(ack["seq"])
                if stuck_session.closing:
                    break
            assert stuck_session.close_code == CloseCode.SLOW_CONSUMER
            # the sender keeps getting acks after the close
            for n in range(5000, 5005):
                ack = await customer.request(text_send(conv, n, "after"))
                acked.append(ack["seq"])
            await wait_for(lambda: seen[-1:] == acked[-1:])
        finally:
            reader.cancel()
        assert seen == acked  # the device that reads got every push
        assert len(acked) > 20
        await w.progressed(1, since=mark)
        # the stuck device now reads: the buffered frames, then close 4001
        assert await stuck.closed() == CloseCode.SLOW_CONSUMER
        back = await dial(http, srv.url, "slow-agent", "agent")
        # pages of 20 big messages fit the send queue (see test_sync_page_of_big_messages)
        assert [m["seq"] for m in await sync_all(back, conv, limit=20)] == acked
        await still_serving(agent)


async def test_sync_page_of_big_messages(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """A reconnecting client must be able to sync, however big the stored messages are.

    One page of ``limit`` (<= max_page) big messages can be larger than send_queue_bytes;
    the reply must then be cut short (has_more) rather than overflow the outbox and close
    the client with 4001 on every attempt, which would leave acked messages unreachable.
    """
    settings = {"send_queue_bytes": 128 * 1024, "rate_per_second": 10_000.0, "rate_burst": 10_000}
    async with custom_server(tmp_path, **settings) as srv, witnessed(http, srv.url):
        _agent, customer, conv = await chat(http, srv.url, "page")
        text = "x" * srv.config.limits.max_body_chars
        acked = [(await customer.request(text_send(conv, n, text)))["seq"] for n in range(1, 41)]
        assert acked == list(range(1, 41))
        reader = await dial(http, srv.url, "page-cust")
        reply = await reader.request({"op": "sync", "id": "s", "conv": conv, "after_seq": 0})
        assert reply["op"] == "messages", reply
        # cut to about half of send_queue_bytes: fewer than limit, but has_more
        assert 0 < len(reply["messages"]) < 40, len(reply["messages"])
        assert reply["has_more"] is True
        assert [m["seq"] for m in reply["messages"]] == acked[: len(reply["messages"])]
        assert [m["seq"] for m in await sync_all(reader, conv)] == acked
        # history pages back the same way: newest first page, each page ascending
        seqs: list[int] = []
        before: int | None = None
        while True:
            request: dict[str, Any] = {"op": "history", "id": f"h{before}", "conv": conv}
            if before is not None:
                request["before_seq"] = before
            page = await reader.request(request)
            assert page["op"] == "messages", page
            got = [m["seq"] for m in page["messages"]]
            assert got
            assert got == sorted(got)
            assert before is None or got[-1] == before - 1
            seqs = got + seqs
            if not page["has_more"]:
                break
            assert len(got) < 40
            before = got[0]
        assert seqs == acked


async def test_page_holds_at_least_one_message(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """A message bigger than the page budget still comes, one per page."""
    settings = {"send_queue_bytes": 40 * 1024}  # a page budget of 20 KiB
    async with custom_server(tmp_path, **settings) as srv:
        _agent, customer, conv = await chat(http, srv.url, "one")
        text = "é" * srv.config.limits.max_body_chars  # 16,000 bytes of UTF-8 in JSON
        acked = [(await customer.request(text_send(conv, n, text)))["seq"] for n in (1, 2, 3)]
        reader = await dial(http, srv.url, "one-cust")
        pages = []
        after = 0
        while True:
            page = await reader.request(
                {"op": "sync", "id": f"s{after}", "conv": conv, "after_seq": after}
            )
            pages.append([m["seq"] for m in page["messages"]])
            if not page["has_more"]:
                break
            after = page["last_seq"]
        assert pages == [[1], [2], [3]]
        assert acked == [1, 2, 3]


async def test_heartbeat_timeout_4000(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    settings = {"heartbeat_interval": 0.3, "heartbeat_misses": 2}
    async with custom_server(tmp_path, **settings) as srv, witnessed(http, srv.url) as w:
        silent = await dial(http, srv.url, "hb-silent", autoping=False)
        answering = await dial(http, srv.url, "hb-answer")  # autoping answers while reading
        listening = asyncio.get_running_loop().create_task(answering.ws.receive())
        mark = w.count
        started = time.monotonic()
        pings = 0
        while True:
            msg = await silent.ws.receive(timeout=5)
            if msg.type is aiohttp.WSMsgType.PING:
                pings += 1
                continue
            break
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
        assert silent.ws.close_code == CloseCode.HEARTBEAT_TIMEOUT
        assert pings >= 1
        assert time.monotonic() - started < 3.0
        await asyncio.sleep(0.5)  # more heartbeat periods pass for the answering client
        assert not listening.done(), listening
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
        await still_serving(answering)
        assert srv.node.hub.count("hb-answer") == 1
        await w.progressed(1, since=mark)


async def test_origin_not_allowed_4503(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with (
        custom_server(tmp_path, allowed_origins="https://shop.example") as srv,
        witnessed(http, srv.url) as w,
    ):
        mark = w.count
        evil = await dial(http, srv.url, "or-1", origin="https://evil.example", hello=False)
        await expect_refused(evil, "forbidden", CloseCode.ORIGIN_FORBIDDEN)
        good = await dial(http, srv.url, "or-1", origin="https://shop.example")
        await still_serving(good)
        await w.progressed(1, since=mark)


# -- resend and devices --------------------------------------------------------------------


async def test_idempotent_resend(server: Server, http: aiohttp.ClientSession) -> None:
    async with witnessed(http, server.url):
        agent, customer, conv = await chat(http, server.url, "idem")
        first = await customer.request(text_send(conv, 1, "once"))
        assert first["op"] == "ack"
        assert first["seq"] == 1
        assert not first.get("duplicate")
        assert (await agent.recv_op("message"))["seq"] == 1
        frame = text_send(conv, 1, "once")
        frame["id"] = "resend"
        again = await customer.request(frame)
        assert again["op"] == "ack"
        assert again["duplicate"] is True
        assert (again["seq"], again["msg_id"]) == (first["seq"], first["msg_id"])
        # a resend from a new connection (after a reconnect) is a duplicate too
        await customer.close()
        customer = await dial(http, server.url, "idem-cust")
        third = await customer.request(text_send(conv, 1, "once"))
        assert third["duplicate"] is True
        assert third["seq"] == 1
        nxt = await customer.request(text_send(conv, 2, "next"))
        assert nxt["seq"] == 2
        # Duplicates are pushed again (the first push may never have happened); the
        # repeats carry the same seq and msg_id, so clients dedupe them by (conv, seq).
        pushes = [await agent.recv_op("message")]
        while pushes[-1]["seq"] != 2:
            pushes.append(await agent.recv_op("message"))
        assert {(p["seq"], p["msg_id"]) for p in pushes} == {
            (1, first["msg_id"]),
            (2, nxt["msg_id"]),
        }
        assert [m["seq"] for m in await sync_all(agent, conv)] == [1, 2]


async def test_idempotency_conflict(server: Server, http: aiohttp.ClientSession) -> None:
    """Same client_msg_id, other type or body: idempotency_conflict; nothing stored or pushed."""
    async with witnessed(http, server.url):
        agent, customer, conv = await chat(http, server.url, "conf")
        first = await customer.request(text_send(conv, 1, "once"))
        assert first["op"] == "ack", first
        assert (await agent.recv_op("message"))["seq"] == 1
        other_body = text_send(conv, 1, "twice")
        other_body["id"] = "other-body"
        other_type = {
            "op": "send",
            "id": "other-type",
            "conv": conv,
            "client_msg_id": "cm-1",
            "type": "image",
            "body": {"url": "https://img.example/a.png", "width": 1, "height": 1},
        }
        for frame in (other_body, other_type):
            reply = await customer.request(frame)
            assert reply["op"] == "error", reply
            assert reply["code"] == "idempotency_conflict", reply
            assert reply["retryable"] is False, reply
            assert reply["id"] == frame["id"]
        # after a reconnect too
        await customer.close()
        customer = await dial(http, server.url, "conf-cust")
        reply = await customer.request(other_body)
        assert reply["code"] == "idempotency_conflict", reply
        # an identical resend still gets the original ack
        same = text_send(conv, 1, "once")
        same["id"] = "same"
        dup = await customer.request(same)
        assert dup["op"] == "ack", dup
        assert dup["duplicate"] is True
        assert (dup["seq"], dup["msg_id"], dup["ts"]) == (
            first["seq"],
            first["msg_id"],
            first["ts"],
        )
        # bodies are compared in canonical form: a card's default currency is the same
        card = {"id": "o", "title": "t", "price": "1", "image_url": "https://x/y.png"}
        card_send = {
            "op": "send",
            "id": "card",
            "conv": conv,
            "client_msg_id": "cm-card",
            "type": "order_card",
            "body": card,
        }
        stored = await customer.request(card_send)
        assert stored["op"] == "ack", stored
        assert stored["seq"] == 2
        # the identical resend above was pushed again (seq 1, deduplicated by clients)
        assert (await agent.recv_op("message"))["seq"] == 1
        assert (await agent.recv_op("message"))["seq"] == 2
        again = await customer.request(
            dict(card_send, id="card-again", body=dict(card, currency="CNY"))
        )
        assert again["op"] == "ack", again
        assert again["duplicate"] is True
        changed = await customer.request(
            dict(card_send, id="card-usd", body=dict(card, currency="USD"))
        )
        assert changed["code"] == "idempotency_conflict", changed
        # the other participant saw only the re-push of the duplicate card, nothing of
        # the conflicts; the store holds the originals only
        assert (await agent.recv_op("message"))["seq"] == 2
        assert (await agent.request({"op": "ping", "id": "p"}))["op"] == "pong"
        messages = await sync_all(agent, conv)
        assert [(m["seq"], m["type"]) for m in messages] == [(1, "text"), (2, "order_card")]
        assert messages[0]["body"] == {"text": "once"}
        assert messages[1]["body"]["currency"] == "CNY"


async def test_context_is_echoed_in_conversation_info(
    server: Server, http: aiohttp.ClientSession
) -> None:
    card = {"id": "L-1", "title": "Bike", "price": "12.50", "image_url": "https://x/l.png"}
    canonical = {**card, "currency": "CNY"}
    agent = await dial(http, server.url, "ctx-agent", "agent")
    customer = await dial(http, server.url, "ctx-cust")
    opened = await agent.request(
        {
            "op": "open",
            "id": "o",
            "customer_id": "ctx-cust",
            "context_type": "listing_card",
            "context": card,
        }
    )
    assert opened["op"] == "conversation", opened
    info = opened["conversation"]
    assert info["context_type"] == "listing_card"
    assert info["context"] == canonical
    assert (await customer.recv_op("conversation"))["conversation"] == info
    listed = await customer.request({"op": "convs", "id": "l"})
    [mine] = [c for c in listed["conversations"] if c["conv"] == info["conv"]]
    assert (mine["context_type"], mine["context"]) == ("listing_card", canonical)
    # without a context (context_type alone is ignored) neither field appears
    plain = await agent.request(
        {"op": "open", "id": "p", "customer_id": "ctx-cust", "context_type": "order_card"}
    )
    assert "context" not in plain["conversation"]
    assert "context_type" not in plain["conversation"]


async def test_server_bug_in_a_request_is_internal(
    server: Server, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug while serving a request costs that request (internal), not the connection."""

    service = server.node.service
    sync = service.sync

    async def broken_sync(session: Any, request: Any) -> None:
        if session.principal.user_id == "bug-1":
            raise ZeroDivisionError("a bug")
        await sync(session, request)

    monkeypatch.setattr(service, "sync", broken_sync)
    async with witnessed(http, server.url) as w:
        client = await dial(http, server.url, "bug-1")
        mark = w.count
        reply = await client.request({"op": "sync", "id": "s", "conv": w.conv})
        assert reply["op"] == "error", reply
        assert reply["code"] == "internal", reply
        assert reply["retryable"] is True
        await still_serving(client)
        await w.progressed(1, since=mark)


async def test_server_bug_outside_a_request_closes_1011(
    server: Server, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = server.node.gateway
    on_text = gateway.on_text

    async def broken_on_text(session: Any, data: bytes | str) -> None:
        if session.principal is not None and session.principal.user_id == "bug-2":
            raise ZeroDivisionError("a bug")
        await on_text(session, data)

    monkeypatch.setattr(gateway, "on_text", broken_on_text)
    async with witnessed(http, server.url) as w:
        client = await dial(http, server.url, "bug-2")
        mark = w.count
        await client.send({"op": "ping", "id": "p"})
        assert await client.closed() == CloseCode.INTERNAL_ERROR
        assert CloseCode.INTERNAL_ERROR.reconnect
        await w.progressed(1, since=mark)


async def test_multi_device(server: Server, http: aiohttp.ClientSession) -> None:
    async with witnessed(http, server.url):
        agent, phone, conv = await chat(http, server.url, "md")
        laptop = await dial(http, server.url, "md-cust")
        ack = await phone.request(text_send(conv, 1, "from phone"))
        assert ack["op"] == "ack"
        on_laptop = await laptop.recv_op("message")
        on_agent = await agent.recv_op("message")
        assert on_laptop["seq"] == on_agent["seq"] == ack["seq"] == 1
        assert on_laptop["sender"] == "md-cust"
        assert on_laptop["body"] == {"text": "from phone"}
        assert (await agent.request(text_send(conv, 2, "from agent")))["op"] == "ack"
        # the phone's next frame is the agent's message, not an echo of its own
        assert (await phone.recv_op("message"))["seq"] == 2
        assert (await laptop.recv_op("message"))["seq"] == 2
