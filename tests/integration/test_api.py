"""The REST API (``/api/v1``) over real HTTP against an in-process node.

Covers the OpenAPI document against the routes the app really serves, the roles of every
route, administration (groups, agents, canned responses), conversations set up over the
WebSocket (filters, text search, paging, private notes), live statistics and reports.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import datetime as dt
import io
import itertools
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import jwt
import pytest

from kefu import ids
from kefu.api.routes import PREFIX, ROUTES
from kefu.model import Agent, Conversation, Principal, Role
from kefu.server import Server
from tests.conftest import SECRET, Connect, RawClient, token

Who = tuple[str, str]
ROOT: Who = ("root", "admin")
NOTHING: Any = object()
_ids = itertools.count(1)


# -- HTTP helpers ------------------------------------------------------------------------------


@dataclasses.dataclass
class Api:
    """A REST client: ``who`` is (user, role) for a Bearer token, None for no token."""

    server: Server
    http: aiohttp.ClientSession

    async def call(
        self,
        method: str,
        path: str,
        who: Who | None = ROOT,
        *,
        body: Any = NOTHING,
        raw: bytes | None = None,
        params: dict[str, str] | None = None,
        auth: str | None = None,
    ) -> tuple[int, Any]:
        headers: dict[str, str] = {}
        if auth is not None:
            headers["Authorization"] = auth
        elif who is not None:
            headers["Authorization"] = f"Bearer {token(*who)}"
        data = raw if raw is not None else None if body is NOTHING else json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        url = self.server.url + PREFIX + path
        async with self.http.request(
            method, url, data=data, params=params, headers=headers
        ) as resp:
            text = await resp.text()
            if resp.content_type == "application/json":
                return resp.status, json.loads(text)
            return resp.status, text

    async def ok(self, method: str, path: str, who: Who | None = ROOT, **kw: Any) -> Any:
        """The body of a 2xx answer (``status`` picks the exact code, default 200)."""
        want = kw.pop("status", 200)
        status, body = await self.call(method, path, who, **kw)
        assert status == want, (method, path, who, status, body)
        return body

    async def get(self, path: str, who: Who | None = ROOT, **params: Any) -> Any:
        return await self.ok("GET", path, who, params={k: str(v) for k, v in params.items()})

    async def error(
        self, method: str, path: str, who: Who | None = ROOT, *, status: int, code: str, **kw: Any
    ) -> str:
        got, body = await self.call(method, path, who, **kw)
        assert isinstance(body, dict) and set(body) == {"error"}, (got, body)
        assert set(body["error"]) == {"code", "message"}, body
        assert (got, body["error"]["code"]) == (status, code), (method, path, who, got, body)
        message: str = body["error"]["message"]
        return message


@pytest.fixture
def api(server: Server, http: aiohttp.ClientSession) -> Api:
    return Api(server, http)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


# -- WebSocket helpers -------------------------------------------------------------------------


async def ws_op(client: RawClient, frame: dict[str, Any], expect: str) -> dict[str, Any]:
    reply = await client.request({"id": f"r{next(_ids)}", **frame})
    assert reply["op"] == expect, reply
    return reply


async def open_conv(
    connect: Connect, customer: str, group: str | None = None
) -> tuple[RawClient, str]:
    """A customer connects and opens a conversation (in ``group``); returns both."""
    client = await connect(customer, "customer")
    frame: dict[str, Any] = {"op": "open"}
    if group is not None:
        frame["group"] = group
    reply = await ws_op(client, frame, "conversation")
    conv: str = reply["conversation"]["conv"]
    # The reply comes first, then the routing: wait until the conversation is queued.
    while True:
        pushed = await client.recv_op("message")
        if pushed["conv"] == conv and pushed["body"].get("event") == "queued":
            return client, conv


async def say(client: RawClient, conv: str, text: str, kind: str = "text") -> int:
    """Send a text (or a private note with ``kind="note"``); returns its seq."""
    frame = {
        "op": "send",
        "conv": conv,
        "client_msg_id": f"m{next(_ids)}",
        "type": kind,
        "body": {"text": text},
    }
    ack = await ws_op(client, frame, "ack")
    seq: int = ack["seq"]
    return seq


async def fresh(server: Server, conv: str) -> Conversation:
    found = await server.node.desk.store.get_conversation(conv, fresh=True)
    assert found is not None
    return found


async def assigned(server: Server, conv: str, agent: str) -> None:
    async def check() -> bool:
        return (await fresh(server, conv)).agent_id == agent

    await eventually(check, f"{conv} assigned to {agent}")


async def configure_agent(
    server: Server, agent: str, groups: tuple[str, ...] = ("general",), capacity: int = 10
) -> None:
    await server.node.desk.save_agent(
        Agent(id=agent, name=agent.title(), capacity=capacity, groups=groups)
    )


def conv_ids(listing: dict[str, Any]) -> set[str]:
    return {c["conv"] for c in listing["conversations"]}


# -- 1. the OpenAPI document ---------------------------------------------------------------------


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, f"unresolvable $ref {ref}"
        node = node[part]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


async def test_openapi_document_matches_the_served_routes(
    server: Server, http: aiohttp.ClientSession
) -> None:
    async with http.get(server.url + "/api/openapi.json") as resp:  # no token needed
        assert resp.status == 200
        assert resp.content_type == "application/json"
        doc = await resp.json()
    assert re.fullmatch(r"3\.\d+\.\d+", doc["openapi"]), doc["openapi"]
    assert doc["info"]["title"] and doc["info"]["version"]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"

    assert server._runner is not None
    registered = {
        (route.method, route.resource.canonical)
        for route in server._runner.app.router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith(PREFIX + "/")
        and route.method != "HEAD"
    }
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    assert registered, "no REST routes registered"
    assert documented == registered
    assert len(registered) == len(ROUTES)

    for ref in _refs(doc):  # every $ref anywhere resolves
        _resolve(doc, ref)
    body_routes = {(r.method, PREFIX + r.path): r for r in ROUTES}
    for path, ops in doc["paths"].items():
        template_params = set(re.findall(r"{(\w+)}", path))
        for method, op in ops.items():
            route = body_routes[(method.upper(), path)]
            assert op["operationId"] and op["summary"], (method, path)
            assert op["security"] == [{"bearer": []}]
            responses = op["responses"]
            assert str(route.status) in responses, (method, path)
            assert {"400", "401", "403"} <= set(responses), (method, path)
            for response in responses.values():
                assert response["description"]
            declared = {p["name"] for p in op["parameters"] if p["in"] == "path"}
            assert declared == template_params, (method, path)
            assert all(p["required"] for p in op["parameters"] if p["in"] == "path")
            if route.body is None:
                assert "requestBody" not in op, (method, path)
                continue
            schema = op["requestBody"]["content"]["application/json"]["schema"]
            assert op["requestBody"]["required"] is True
            ref = schema["$ref"]
            assert ref.startswith("#/components/schemas/"), ref
            target = _resolve(doc, ref)
            assert target["type"] == "object" and target["properties"], (method, path)


# -- 2. roles and tokens on every route ----------------------------------------------------------


async def _role_fixture(api: Api, server: Server) -> dict[tuple[str, str], tuple[str, Any]]:
    """Plausible requests for every route: (method, template) -> (path, body)."""
    await configure_agent(server, "ag1")
    conv = await server.node.desk.open_by_agent(
        Principal("ag1", Role.AGENT), "cu1", None, None, None
    )
    canned = await api.ok(
        "POST", "/canned-responses", body={"shortcut": "bye", "text": "Bye"}, status=201
    )
    return {
        ("GET", "/conversations"): ("/conversations", NOTHING),
        ("GET", "/conversations/{conv}"): (f"/conversations/{conv.id}", NOTHING),
        ("GET", "/conversations/{conv}/messages"): (f"/conversations/{conv.id}/messages", NOTHING),
        ("GET", "/groups"): ("/groups", NOTHING),
        ("POST", "/groups"): ("/groups", {"id": "g-roles", "name": "Roles"}),
        ("PATCH", "/groups/{group}"): ("/groups/general", {"welcome": "Hi"}),
        ("GET", "/agents"): ("/agents", NOTHING),
        ("POST", "/agents"): ("/agents", {"id": "a-roles", "name": "R", "groups": ["general"]}),
        ("PATCH", "/agents/{agent}"): ("/agents/ag1", {"capacity": 5}),
        ("GET", "/canned-responses"): ("/canned-responses", NOTHING),
        ("POST", "/canned-responses"): ("/canned-responses", {"shortcut": "hi", "text": "Hi"}),
        ("DELETE", "/canned-responses/{canned}"): (f"/canned-responses/{canned['id']}", NOTHING),
        ("GET", "/stats/live"): ("/stats/live", NOTHING),
        ("GET", "/reports"): ("/reports", NOTHING),
        ("GET", "/cluster"): ("/cluster", NOTHING),
    }


USERS: dict[Role, Who] = {
    Role.CUSTOMER: ("cu1", "customer"),
    Role.AGENT: ("ag1", "agent"),
    Role.ADMIN: ROOT,
}


async def test_every_route_refuses_the_roles_it_does_not_admit(api: Api, server: Server) -> None:
    requests = await _role_fixture(api, server)
    assert set(requests) == {(r.method, r.path) for r in ROUTES}, "a route lacks a sample"
    refused = 0
    for route in ROUTES:
        path, body = requests[(route.method, route.path)]
        for role in set(USERS) - route.roles:
            message = await api.error(
                route.method, path, USERS[role], body=body, status=403, code="forbidden"
            )
            assert route.path in message
            refused += 1
    assert refused >= 10
    assert "g-roles" not in server.node.desk.groups  # refused requests changed nothing
    assert "a-roles" not in server.node.desk.agents
    # ... and every admitted role gets an answer (the samples are all valid for them).
    for route in ROUTES:
        path, body = requests[(route.method, route.path)]
        for role in route.roles:
            await api.ok(route.method, path, USERS[role], body=body, status=route.status)


def _forged(role: str = "admin") -> str:
    claims = {"sub": "root", "role": role, "exp": int(time.time()) + 600}
    return jwt.encode(claims, "not-the-" + SECRET, algorithm="HS256")


def _promoted() -> str:
    """A customer's token with an admin's payload pasted in (the signature no longer fits)."""
    header, _, signature = token("cu1", "customer").split(".")
    payload = token("cu1", "admin").split(".")[1]
    return f"{header}.{payload}.{signature}"


BAD_AUTH = [
    (None, "unauthenticated"),
    ("", "unauthenticated"),
    ("Bearer", "unauthenticated"),
    ("Bearer    ", "unauthenticated"),
    (f"Basic {token(*ROOT)}", "unauthenticated"),
    ("Bearer not-a-jwt", "invalid_token"),
    (f"Bearer {_forged()}", "invalid_token"),
    (f"Bearer {_promoted()}", "invalid_token"),
    (
        "Bearer "
        + jwt.encode({"sub": "root", "role": "admin", "exp": 2**40}, None, algorithm="none"),
        "invalid_token",
    ),
    (
        "Bearer " + jwt.encode({"sub": "root", "role": "system", "exp": 2**40}, SECRET),
        "invalid_token",
    ),
    (f"Bearer {token('root', 'admin', ttl=-60)}", "token_expired"),
    (f"bearer {token('root', 'admin', ttl=-60)}", "token_expired"),
]


async def test_every_route_needs_a_valid_token(api: Api, server: Server) -> None:
    requests = await _role_fixture(api, server)
    for route in ROUTES:
        path, body = requests[(route.method, route.path)]
        for header, code in BAD_AUTH:
            if header is None:
                await api.error(
                    route.method, path, None, body=body, status=401, code="unauthenticated"
                )
            else:
                await api.error(route.method, path, body=body, auth=header, status=401, code=code)
    assert "g-roles" not in server.node.desk.groups
    assert len(await server.node.desk.store.list_canned(None)) == 1


# -- 3. groups and agents ----------------------------------------------------------------------


SCHEDULE = {"timezone": "Asia/Shanghai", "hours": {"mon": [["09:00", "18:00"]]}}


async def _groups(api: Api) -> dict[str, Any]:
    return {g["id"]: g for g in await api.get("/groups")}


async def _agents(api: Api) -> dict[str, Any]:
    return {a["id"]: a for a in await api.get("/agents")}


async def test_groups_create_conflict_patch_and_validation(api: Api, server: Server) -> None:
    created = await api.ok("POST", "/groups", body={"id": "sales", "name": "Sales"}, status=201)
    assert created["id"] == "sales" and created["mode"] == "auto" and created["created_at"] > 0
    assert set(await _groups(api)) == {"general", "sales"}
    assert set(g["id"] for g in await api.get("/groups", ("ag9", "agent"))) == {"general", "sales"}
    await api.error(
        "POST", "/groups", body={"id": "sales", "name": "X"}, status=409, code="conflict"
    )
    await api.error(
        "POST", "/groups", body={"id": "general", "name": "X"}, status=409, code="conflict"
    )
    assert (await _groups(api))["sales"]["name"] == "Sales"

    patched = await api.ok("PATCH", "/groups/sales", body={"schedule": SCHEDULE, "max_queue": 5})
    assert patched["schedule"] == SCHEDULE and patched["max_queue"] == 5
    assert patched["name"] == "Sales"  # untouched fields are kept
    listed = (await _groups(api))["sales"]
    assert listed["schedule"] == SCHEDULE and listed["max_queue"] == 5
    stored = {g.id: g for g in await server.node.desk.store.list_groups()}["sales"]
    assert stored.schedule == SCHEDULE and stored.max_queue == 5  # persisted

    before = await _groups(api)
    bad_patches: list[dict[str, Any]] = [
        {"max_queue": -1},
        {"max_queue": 10**7},
        {"max_wait": -1},
        {"max_wait": 10**9},
        {"schedule": {"timezone": "Mars/Olympus", "hours": {}}},
        {"schedule": {"timezone": "UTC", "hours": {"mon": [["09:00", "25:00"]]}}},
        {"schedule": {"timezone": "UTC", "hours": {"mon": [["18:00", "09:00"]]}}},
        {"schedule": {"timezone": "UTC", "hours": {"funday": [["09:00", "18:00"]]}}},
        {"schedule": {"timezone": "UTC", "colour": "red"}},
    ]
    for patch in bad_patches:
        await api.error("PATCH", "/groups/sales", body=patch, status=400, code="invalid_argument")
    assert await _groups(api) == before
    for body in (
        {"id": "night", "name": "Night", "schedule": {"timezone": "Nowhere/Land"}},
        {"id": "night", "name": "Night", "schedule": {"hours": {"tue": [["25:00", "26:00"]]}}},
        {"id": "night", "name": "Night", "max_queue": -5},
    ):
        await api.error("POST", "/groups", body=body, status=400, code="invalid_argument")
    assert "night" not in await _groups(api)

    await api.error("PATCH", "/groups/nope", body={"name": "N"}, status=404, code="not_found")
    assert "nope" not in await _groups(api)

    for raw in (b"{not json", b"", b'{"id": "x", "name": "y"', b"\xff\xfe"):
        await api.error("POST", "/groups", raw=raw, status=400, code="bad_json")
    for raw in (b"{not json", b"", b'{"name": "y"', b"{'name': 'y'}"):
        await api.error("PATCH", "/groups/sales", raw=raw, status=400, code="bad_json")
    for body in (
        {"id": "x", "name": "X", "colour": "red"},  # unknown field
        {"id": "x", "name": 5},  # wrong type
        {"name": "X"},  # missing id
        {"id": "bad id!", "name": "X"},  # id pattern
        {"id": "x", "name": "X", "mode": "lottery"},
        [1, 2],
    ):
        await api.error("POST", "/groups", body=body, status=400, code="bad_frame")
    await api.error("PATCH", "/groups/sales", body={"colour": "red"}, status=400, code="bad_frame")
    assert await _groups(api) == before


async def test_agents_create_conflict_patch_and_validation(api: Api, server: Server) -> None:
    await api.ok("POST", "/groups", body={"id": "sales", "name": "Sales"}, status=201)
    body = {"id": "ann", "name": "Ann", "groups": ["general", "sales"], "capacity": 3}
    created = await api.ok("POST", "/agents", body=body, status=201)
    assert created["capacity"] == 3 and created["groups"] == ["general", "sales"]
    assert created["status"] == "offline" and created["load"] == 0
    await api.error("POST", "/agents", body=body, status=409, code="conflict")

    patched = await api.ok("PATCH", "/agents/ann", body={"capacity": 5})
    assert patched["capacity"] == 5 and patched["groups"] == ["general", "sales"]
    assert (await _agents(api))["ann"]["capacity"] == 5
    stored = {a.id: a for a in await server.node.desk.store.list_agents()}["ann"]
    assert stored.capacity == 5  # persisted
    assert (await server.node.desk.routing.agent("ann")).capacity == 5  # type: ignore[union-attr]
    patched = await api.ok("PATCH", "/agents/ann", body={"groups": ["sales"], "name": "Anne"})
    assert patched["groups"] == ["sales"] and patched["name"] == "Anne"

    limit = server.node.desk.settings.max_capacity
    before = await _agents(api)
    for capacity in (-1, 0, limit + 1, 10**6):
        await api.error(
            "PATCH", "/agents/ann", body={"capacity": capacity}, status=400, code="invalid_argument"
        )
        await api.error(
            "POST",
            "/agents",
            body={"id": "bob", "name": "Bob", "groups": [], "capacity": capacity},
            status=400,
            code="invalid_argument",
        )
    await api.error(
        "PATCH", "/agents/ann", body={"groups": ["general", "ghosts"]}, status=404, code="not_found"
    )
    await api.error(
        "POST",
        "/agents",
        body={"id": "bob", "name": "Bob", "groups": ["ghosts"]},
        status=404,
        code="not_found",
    )
    await api.error("PATCH", "/agents/nobody", body={"capacity": 2}, status=404, code="not_found")
    assert await _agents(api) == before
    assert set(server.node.desk.agents) == {"ann"}

    edge = await api.ok(
        "POST",
        "/agents",
        body={"id": "max", "name": "Max", "groups": [], "capacity": limit},
        status=201,
    )
    assert edge["capacity"] == limit
    default = await api.ok(
        "POST", "/agents", body={"id": "dee", "name": "Dee", "groups": ["general"]}, status=201
    )
    assert default["capacity"] >= 1

    await api.error("POST", "/agents", raw=b"capacity=3", status=400, code="bad_json")
    await api.error("PATCH", "/agents/ann", raw=b"{", status=400, code="bad_json")
    for bad in (
        {"id": "eve", "name": "Eve", "groups": [], "skill": 9},
        {"id": "eve", "name": "Eve", "groups": "general"},
        {"id": "eve", "name": "Eve", "groups": [], "capacity": 2.5},
        {"id": "eve", "name": "", "groups": []},
    ):
        await api.error("POST", "/agents", body=bad, status=400, code="bad_frame")
    await api.error("PATCH", "/agents/ann", body={"status": "online"}, status=400, code="bad_frame")
    assert "eve" not in await _agents(api)


async def test_truncated_json_is_bad_json_whatever_its_fields(api: Api) -> None:
    await api.error(
        "PATCH", "/groups/general", raw=b'{"id": "x", "name": "y"', status=400, code="bad_json"
    )


# -- 4. conversations --------------------------------------------------------------------------


@dataclasses.dataclass
class Traffic:
    """Three customers in two groups, served by two agents, with a private note."""

    ag1: RawClient
    ag2: RawClient
    customers: dict[str, RawClient]
    convs: dict[str, str]  # customer -> conversation
    note_seq: int


NOTE = "secret-note-xyz"


async def _traffic(api: Api, server: Server, connect: Connect) -> Traffic:
    await api.ok("POST", "/groups", body={"id": "sales", "name": "Sales"}, status=201)
    await api.ok(
        "POST", "/agents", body={"id": "ag1", "name": "A1", "groups": ["general"]}, status=201
    )
    await api.ok(
        "POST", "/agents", body={"id": "ag2", "name": "A2", "groups": ["sales"]}, status=201
    )
    ag1 = await connect("ag1", "agent")
    ag2 = await connect("ag2", "agent")
    customers: dict[str, RawClient] = {}
    convs: dict[str, str] = {}
    for customer, group, agent, text in (
        ("cu1", None, "ag1", "Hello, my ORDER #42 is late"),
        ("cu2", None, "ag1", "I want a refund"),
        ("cu3", "sales", "ag2", "An order question about pricing"),
    ):
        client, conv = await open_conv(connect, customer, group)
        await say(client, conv, text)
        await assigned(server, conv, agent)
        customers[customer], convs[customer] = client, conv
    await say(ag1, convs["cu1"], "Sorry about that, checking")
    note_seq = await say(ag1, convs["cu1"], f"{NOTE}: customer seems angry", kind="note")
    return Traffic(ag1, ag2, customers, convs, note_seq)


async def test_conversation_list_filters_and_visibility(
    api: Api, server: Server, connect: Connect
) -> None:
    t = await _traffic(api, server, connect)
    c1, c2, c3 = t.convs["cu1"], t.convs["cu2"], t.convs["cu3"]

    everything = await api.get("/conversations")
    assert conv_ids(everything) == {c1, c2, c3}
    assert everything["next_before"] is None
    info = {c["conv"]: c for c in everything["conversations"]}
    assert info[c1]["customer"] == "cu1" and info[c1]["agent"] == "ag1"
    assert info[c3]["group"] == "sales" and info[c3]["state"] == "assigned"

    assert conv_ids(await api.get("/conversations", state="assigned")) == {c1, c2, c3}
    assert conv_ids(await api.get("/conversations", state="queued,closed")) == set()
    assert conv_ids(await api.get("/conversations", group="sales")) == {c3}
    assert conv_ids(await api.get("/conversations", group="general")) == {c1, c2}
    assert conv_ids(await api.get("/conversations", agent="ag1")) == {c1, c2}
    assert conv_ids(await api.get("/conversations", customer="cu2")) == {c2}
    assert conv_ids(await api.get("/conversations", agent="ag1", customer="cu3")) == set()
    await api.error(
        "GET", "/conversations", params={"state": "bogus"}, status=400, code="invalid_argument"
    )
    for bad in ({"limit": "0"}, {"limit": "201"}, {"limit": "ten"}, {"before": "-1"}):
        await api.error("GET", "/conversations", params=bad, status=400, code="invalid_argument")

    # Customers see only their own; asking for someone else's is refused.
    cu1 = ("cu1", "customer")
    assert conv_ids(await api.get("/conversations", cu1)) == {c1}
    assert conv_ids(await api.get("/conversations", cu1, customer="cu1")) == {c1}
    assert conv_ids(await api.get("/conversations", cu1, group="sales")) == set()
    await api.error(
        "GET", "/conversations", cu1, params={"customer": "cu2"}, status=403, code="forbidden"
    )
    assert conv_ids(await api.get("/conversations", ("nobody", "customer"))) == set()
    # Agents only theirs.
    ag1, ag2 = ("ag1", "agent"), ("ag2", "agent")
    assert conv_ids(await api.get("/conversations", ag1)) == {c1, c2}
    assert conv_ids(await api.get("/conversations", ag2)) == {c3}
    assert conv_ids(await api.get("/conversations", ag1, agent="ag1", group="sales")) == set()
    await api.error(
        "GET", "/conversations", ag1, params={"agent": "ag2"}, status=403, code="forbidden"
    )

    # Detail: the owner, the holder and admins read it; others are refused; unknown is 404.
    detail = await api.get(f"/conversations/{c1}", cu1)
    assert detail["conversation"]["conv"] == c1
    assert detail["conversation"]["last_seq"] == t.note_seq
    timeline = detail["timeline"]
    assert timeline["created_at"] <= timeline["first_assigned_at"] <= timeline["first_response_at"]
    assert timeline["resolved_at"] is None and timeline["closed_at"] is None
    assert detail["labels"] == [] and detail["csat_comment"] is None
    await api.get(f"/conversations/{c1}", ag1)
    await api.get(f"/conversations/{c1}")
    await api.error(
        "GET", f"/conversations/{c1}", ("cu2", "customer"), status=403, code="forbidden"
    )
    await api.error("GET", f"/conversations/{c1}", ag2, status=403, code="forbidden")
    await api.error(
        "GET", f"/conversations/{c1}/messages", ("cu2", "customer"), status=403, code="forbidden"
    )
    await api.error("GET", f"/conversations/{c1}/messages", ag2, status=403, code="forbidden")
    for who in (cu1, ag1, ROOT):
        await api.error("GET", "/conversations/no-such-conv", who, status=404, code="not_found")
        await api.error(
            "GET", "/conversations/no-such-conv/messages", who, status=404, code="not_found"
        )


async def test_text_search_finds_message_text_but_never_notes_for_customers(
    api: Api, server: Server, connect: Connect
) -> None:
    t = await _traffic(api, server, connect)
    c1, c2, c3 = t.convs["cu1"], t.convs["cu2"], t.convs["cu3"]
    cu1, cu2 = ("cu1", "customer"), ("cu2", "customer")

    assert conv_ids(await api.get("/conversations", q="order")) == {c1, c3}  # case-insensitive
    assert conv_ids(await api.get("/conversations", q="ORDER #42")) == {c1}
    assert conv_ids(await api.get("/conversations", q="Refund")) == {c2}
    assert conv_ids(await api.get("/conversations", q="checking")) == {c1}  # the agent's reply
    assert conv_ids(await api.get("/conversations", q="no such words")) == set()
    assert conv_ids(await api.get("/conversations", q="order", group="sales")) == {c3}
    assert conv_ids(await api.get("/conversations", cu1, q="order")) == {c1}
    assert conv_ids(await api.get("/conversations", cu2, q="order")) == set()
    assert conv_ids(await api.get("/conversations", ("ag1", "agent"), q="order")) == {c1}

    # The private note: staff find it, customers never do.
    assert conv_ids(await api.get("/conversations", q=NOTE)) == {c1}
    assert conv_ids(await api.get("/conversations", ("ag1", "agent"), q="SECRET-note")) == {c1}
    assert conv_ids(await api.get("/conversations", cu1, q=NOTE)) == set()
    assert conv_ids(await api.get("/conversations", cu1, q="angry")) == set()
    # System messages (queued, assignment events) are not searched.
    assert conv_ids(await api.get("/conversations", q="assign")) == set()


async def test_text_search_matches_the_text_not_the_json_around_it(
    api: Api, server: Server, connect: Connect
) -> None:
    await configure_agent(server, "ag1")
    _agent = await connect("ag1", "agent")  # keep it: a dropped client disconnects
    client, conv = await open_conv(connect, "cu1")
    await say(client, conv, 'hello there, I said "now"')
    assert conv_ids(await api.get("/conversations", q="hello")) == {conv}
    assert conv_ids(await api.get("/conversations", q="text")) == set()  # the JSON key
    assert conv_ids(await api.get("/conversations", q='":"')) == set()
    assert conv_ids(await api.get("/conversations", q='said "now"')) == {conv}  # stored \"now\"


async def test_text_search_finds_non_ascii_text_sent_escaped(
    api: Api, server: Server, connect: Connect
) -> None:
    await configure_agent(server, "ag1")
    _agent = await connect("ag1", "agent")  # keep it: a dropped client disconnects
    client, conv = await open_conv(connect, "cu1")
    # RawClient sends json.dumps' \uXXXX escapes; the server stores a canonical encoding.
    await say(client, conv, "你好，我的订单没到")
    assert conv_ids(await api.get("/conversations", q="订单")) == {conv}


async def test_text_search_is_case_insensitive_beyond_ascii(
    api: Api, server: Server, connect: Connect
) -> None:
    await configure_agent(server, "ag1")
    _agent = await connect("ag1", "agent")  # keep it: a dropped client disconnects
    client, conv = await open_conv(connect, "cu1")
    frame = {
        "op": "send",
        "id": "utf8",
        "conv": conv,
        "client_msg_id": "utf8",
        "type": "text",
        "body": {"text": "ÄRGER mit der Bestellung"},
    }
    await client.ws.send_str(json.dumps(frame, ensure_ascii=False))  # raw UTF-8
    assert (await client.recv_op("ack"))["id"] == "utf8"
    assert conv_ids(await api.get("/conversations", q="ÄRGER")) == {conv}
    assert conv_ids(await api.get("/conversations", q="ärger")) == {conv}


async def test_conversation_paging_returns_each_exactly_once(
    api: Api, server: Server, connect: Connect
) -> None:
    await configure_agent(server, "ag1", capacity=50)
    agent = await connect("ag1", "agent")
    made = set()
    for n in range(7):
        reply = await ws_op(agent, {"op": "open", "customer_id": f"c{n}"}, "conversation")
        made.add(reply["conversation"]["conv"])
        await asyncio.sleep(0.003)  # distinct activity times
    for limit in (1, 2, 3, 7, 50):
        seen: list[str] = []
        params: dict[str, Any] = {"limit": limit}
        pages = 0
        while True:
            page = await api.get("/conversations", **params)
            pages += 1
            assert len(page["conversations"]) <= limit
            seen += [c["conv"] for c in page["conversations"]]
            if page["next_before"] is None:
                break
            params["before"] = page["next_before"]
            assert pages < 20
        assert sorted(seen) == sorted(made), limit
        assert len(seen) == len(set(seen)), limit
        assert pages == -(-len(made) // limit), limit  # no empty trailing page
    # Agents page through their own the same way.
    first = await api.get("/conversations", ("ag1", "agent"), limit=4)
    rest = await api.get("/conversations", ("ag1", "agent"), limit=4, before=first["next_before"])
    assert conv_ids(first) | conv_ids(rest) == made and rest["next_before"] is None


async def test_conversation_paging_survives_equal_activity_times(
    api: Api, server: Server, connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    await configure_agent(server, "ag1", capacity=50)
    agent = await connect("ag1", "agent")
    made = set()
    frozen = ids.now_ms()
    monkeypatch.setattr(ids, "now_ms", lambda: frozen)  # a burst within one millisecond
    for n in range(4):
        reply = await ws_op(agent, {"op": "open", "customer_id": f"c{n}"}, "conversation")
        made.add(reply["conversation"]["conv"])
    monkeypatch.undo()
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 2}
    for _ in range(5):
        page = await api.get("/conversations", **params)
        seen += [c["conv"] for c in page["conversations"]]
        if page["next_before"] is None:
            break
        params["before"] = page["next_before"]
    assert sorted(seen) == sorted(made)


async def test_conversation_list_orders_by_latest_change(
    api: Api, server: Server, connect: Connect
) -> None:
    """REST lists by the latest lifecycle change (state, agent, labels), not by messages:
    the WebSocket `convs` list is the one ordered by chat activity."""
    await configure_agent(server, "ag1")
    _agent = await connect("ag1", "agent")  # keep it: a dropped client disconnects
    old_client, old = await open_conv(connect, "cu1")
    await assigned(server, old, "ag1")
    await asyncio.sleep(0.01)
    _, new = await open_conv(connect, "cu2")
    await assigned(server, new, "ag1")
    await asyncio.sleep(0.01)
    await say(old_client, old, "still there?")  # a message is not a change
    listing = await api.get("/conversations")
    assert [c["conv"] for c in listing["conversations"]] == [new, old]


async def test_messages_paging_and_private_notes(
    api: Api, server: Server, connect: Connect
) -> None:
    await configure_agent(server, "ag1")
    agent = await connect("ag1", "agent")
    customer, conv = await open_conv(connect, "cu1")
    await assigned(server, conv, "ag1")
    texts = [f"message {n}" for n in range(5)]
    for text in texts:
        await say(customer, conv, text)
    reply_seq = await say(agent, conv, "How can I help?")
    note_seq = await say(agent, conv, "secret", kind="note")
    path = f"/conversations/{conv}/messages"
    cu1, ag1 = ("cu1", "customer"), ("ag1", "agent")

    full = await api.get(path, limit=200)
    seqs = [m["seq"] for m in full["messages"]]
    assert seqs == list(range(1, note_seq + 1))  # every message, in order, no gaps
    assert full["has_more"] is False and full["last_seq"] == note_seq and full["conv"] == conv
    bodies = [m["body"] for m in full["messages"] if m["type"] == "text"]
    assert bodies[-6:] == [{"text": t} for t in [*texts, "How can I help?"]]
    note = full["messages"][-1]
    assert note["type"] == "note" and note["body"] == {"text": "secret"} and note["sender"] == "ag1"

    # Staff see the note; the customer never does, yet last_seq covers it.
    assert (await api.get(path, ag1))["messages"][-1]["seq"] == note_seq
    own = await api.get(path, cu1, limit=200)
    assert note_seq not in [m["seq"] for m in own["messages"]]
    assert all(m["type"] != "note" for m in own["messages"])
    assert [m["seq"] for m in own["messages"]] == seqs[:-1]
    assert own["last_seq"] == note_seq
    latest = await api.get(path, cu1, limit=2)
    assert [m["seq"] for m in latest["messages"]] == [reply_seq]
    assert latest["last_seq"] == note_seq and latest["has_more"] is True
    for who in (ag1, cu1):
        after = await api.get(path, who, after_seq=reply_seq)
        visible = [m["seq"] for m in after["messages"]]
        assert visible == ([note_seq] if who == ag1 else [])
        assert after["has_more"] is False

    # Backwards with before_seq: each message exactly once, newest page first.
    for limit in (1, 2, 3):
        got: list[int] = []
        page = await api.get(path, limit=limit)
        while True:
            page_seqs = [m["seq"] for m in page["messages"]]
            assert page_seqs == sorted(page_seqs) and len(page_seqs) <= limit
            got = page_seqs + got
            if not page["has_more"]:
                break
            page = await api.get(path, limit=limit, before_seq=page_seqs[0])
        assert got == seqs, limit
    # Forwards with after_seq.
    for limit in (1, 4):
        got = []
        after = 0
        while True:
            page = await api.get(path, limit=limit, after_seq=after)
            got += [m["seq"] for m in page["messages"]]
            if not page["has_more"]:
                break
            after = got[-1]
        assert got == seqs, limit
    assert (await api.get(path, after_seq=note_seq))["messages"] == []
    assert (await api.get(path, before_seq=1))["messages"] == []
    await api.error(
        "GET",
        path,
        params={"after_seq": "1", "before_seq": "5"},
        status=400,
        code="invalid_argument",
    )
    for bad in ({"limit": "0"}, {"limit": "1000"}, {"after_seq": "-1"}, {"before_seq": "x"}):
        await api.error("GET", path, params=bad, status=400, code="invalid_argument")


# -- 5. canned responses -----------------------------------------------------------------------


async def test_canned_responses_scoped_by_group(api: Api, server: Server) -> None:
    await api.ok("POST", "/groups", body={"id": "sales", "name": "Sales"}, status=201)
    await configure_agent(server, "ag1", ("general",))
    made = {}
    for shortcut, group in (("hello", None), ("gen", "general"), ("deal", "sales")):
        body: dict[str, Any] = {"shortcut": shortcut, "text": f"{shortcut} text"}
        if group is not None:
            body["group"] = group
        out = await api.ok("POST", "/canned-responses", body=body, status=201)
        assert out["group"] == group and out["shortcut"] == shortcut and out["id"]
        made[shortcut] = out["id"]
    await api.error(
        "POST",
        "/canned-responses",
        body={"shortcut": "x", "text": "x", "group": "ghosts"},
        status=404,
        code="not_found",
    )
    for bad in (
        {"shortcut": "", "text": "x"},
        {"shortcut": "x"},
        {"shortcut": "x", "text": "y", "z": 1},
    ):
        await api.error("POST", "/canned-responses", body=bad, status=400, code="bad_frame")

    def shortcuts(items: list[dict[str, Any]]) -> set[str]:
        return {c["shortcut"] for c in items}

    ag1 = ("ag1", "agent")
    assert shortcuts(await api.get("/canned-responses")) == {"hello", "gen", "deal"}
    assert shortcuts(await api.get("/canned-responses", group="sales")) == {"hello", "deal"}
    assert shortcuts(await api.get("/canned-responses", ag1)) == {"hello", "gen"}
    assert shortcuts(await api.get("/canned-responses", ag1, group="general")) == {"hello", "gen"}
    await api.error(
        "GET", "/canned-responses", ag1, params={"group": "sales"}, status=403, code="not_member"
    )
    await api.error(
        "GET", "/canned-responses", ag1, params={"group": "ghosts"}, status=403, code="not_member"
    )

    deleted = await api.ok("DELETE", f"/canned-responses/{made['deal']}")
    assert deleted == {"deleted": True}
    await api.error("DELETE", f"/canned-responses/{made['deal']}", status=404, code="not_found")
    await api.error("DELETE", "/canned-responses/never-was", status=404, code="not_found")
    assert shortcuts(await api.get("/canned-responses")) == {"hello", "gen"}


# -- 6. live statistics -------------------------------------------------------------------------


async def test_live_stats_reflect_queue_and_agents(
    api: Api, server: Server, connect: Connect
) -> None:
    await configure_agent(server, "ag1", capacity=1)

    def group(stats: dict[str, Any], name: str = "general") -> dict[str, Any]:
        (found,) = [g for g in stats["groups"] if g["group"] == name]
        return found

    stats = await api.get("/stats/live")
    assert group(stats) == {
        "group": "general",
        "queued": 0,
        "left_messages": 0,
        "longest_wait": 0.0,
        "agents_online": 0,
    }
    assert [a["status"] for a in stats["agents"] if a["agent"] == "ag1"] == ["offline"]
    assert stats["ts"] > 0

    # No agent online: the customer waits (offered to leave a message).
    _, first = await open_conv(connect, "cu1")

    # The "queued" push comes out just before the routing state takes the entry (a Redis
    # round trip on shared backends): wait for the stats to show it.
    async def counted() -> bool:
        waiting = group(await api.get("/stats/live"))
        return bool(waiting["queued"] + waiting["left_messages"] == 1)

    await eventually(counted, "the waiting conversation in the live stats")
    stats = await api.get("/stats/live")
    waiting = group(stats)
    assert waiting["queued"] + waiting["left_messages"] == 1
    assert waiting["agents_online"] == 0 and waiting["longest_wait"] >= 0

    # The agent connects: online, takes the waiting conversation.
    agent = await connect("ag1", "agent")
    await assigned(server, first, "ag1")
    stats = await api.get("/stats/live")
    assert group(stats)["agents_online"] == 1
    assert group(stats)["queued"] + group(stats)["left_messages"] == 0
    (me,) = [a for a in stats["agents"] if a["agent"] == "ag1"]
    assert me == {
        "agent": "ag1",
        "status": "online",
        "load": 1,
        "capacity": 1,
        "groups": ["general"],
    }

    # At capacity: the next customer queues live.
    _, second = await open_conv(connect, "cu2")
    await asyncio.sleep(0.05)
    stats = await api.get("/stats/live")
    assert group(stats)["queued"] == 1 and group(stats)["left_messages"] == 0
    assert group(stats)["longest_wait"] >= 0.04
    assert (await fresh(server, second)).agent_id is None

    # The agent leaves: no one online.
    await agent.close()

    async def offline() -> bool:
        return group(await api.get("/stats/live"))["agents_online"] == 0

    await eventually(offline, "the agent to go offline")


# -- 7. reports ---------------------------------------------------------------------------------


async def _history(api: Api, server: Server, connect: Connect) -> dict[str, str]:
    """cu3 abandons in the queue; cu1 (rated 4) and cu2 (rated 2) are served by ag1 and
    resolved; cu4 waits in the unstaffed sales queue."""
    await api.ok("POST", "/groups", body={"id": "sales", "name": "Sales"}, status=201)
    await configure_agent(server, "ag1", ("general",))
    convs = {}
    quitter, convs["cu3"] = await open_conv(connect, "cu3")
    await ws_op(quitter, {"op": "close", "conv": convs["cu3"]}, "conversation")
    _, convs["cu4"] = await open_conv(connect, "cu4", "sales")
    agent = await connect("ag1", "agent")
    for customer, score in (("cu1", 4), ("cu2", 2)):
        client, conv = await open_conv(connect, customer)
        convs[customer] = conv
        await say(client, conv, "help")
        await assigned(server, conv, "ag1")
        await asyncio.sleep(0.005)
        await say(agent, conv, "here to help")

        async def responded(conv: str = conv) -> bool:
            return (await fresh(server, conv)).first_response_at is not None

        await eventually(responded, "the first response stamp")
        await asyncio.sleep(0.005)
        resolved = await ws_op(agent, {"op": "resolve", "conv": conv}, "conversation")
        assert resolved["conversation"]["state"] == "resolved"
        rated = await ws_op(client, {"op": "rate", "conv": conv, "score": score}, "conversation")
        assert rated["conversation"]["csat_score"] == score
    return convs


def _times_consistent(row: dict[str, Any]) -> None:
    for kind in ("wait", "first_response", "resolution"):
        for stat in ("avg", "median"):
            value = row[f"{kind}_{stat}_s"]
            assert value is None or value >= 0, row
    if row["resolved"]:
        assert row["wait_avg_s"] <= row["first_response_avg_s"] <= row["resolution_avg_s"], row
        assert (
            row["wait_median_s"] <= row["first_response_median_s"] <= row["resolution_median_s"]
        ), row


async def test_report_by_group_and_agent(api: Api, server: Server, connect: Connect) -> None:
    await _history(api, server, connect)

    by_group = await api.get("/reports", by="group", **{"from": "2000-01-01", "to": "2100-01-01"})
    assert by_group["by"] == "group" and by_group["start"] < by_group["end"]
    rows = {r["key"]: r for r in by_group["rows"]}
    assert list(rows) == ["general", "sales"]
    general = rows["general"]
    assert {k: general[k] for k in general if not k.endswith("_s")} == {
        "key": "general",
        "conversations": 3,
        "assigned": 2,
        "resolved": 2,
        "abandoned": 1,
        "abandonment_rate": 0.3333,
        "csat_count": 2,
        "csat_avg": 3.0,
    }
    assert all(general[k] is not None for k in general)
    _times_consistent(general)
    assert rows["sales"] == {
        "key": "sales",
        "conversations": 1,
        "assigned": 0,
        "resolved": 0,
        "abandoned": 0,
        "abandonment_rate": 0.0,
        "wait_avg_s": None,
        "wait_median_s": None,
        "first_response_avg_s": None,
        "first_response_median_s": None,
        "resolution_avg_s": None,
        "resolution_median_s": None,
        "csat_count": 0,
        "csat_avg": None,
    }

    by_agent = await api.get("/reports", by="agent")  # default range: the last 7 days
    assert by_agent["end"] - by_agent["start"] == 7 * 86_400_000
    (row,) = by_agent["rows"]
    assert {k: row[k] for k in row if not k.endswith("_s")} == {
        "key": "ag1",
        "conversations": 2,
        "assigned": 2,
        "resolved": 2,
        "abandoned": 0,
        "abandonment_rate": 0.0,
        "csat_count": 2,
        "csat_avg": 3.0,
    }
    _times_consistent(row)
    for stat in ("wait", "first_response", "resolution"):
        assert row[f"{stat}_avg_s"] == general[f"{stat}_avg_s"]  # the same two conversations

    # CSV: the header and the same figures.
    for by, json_rows in (("group", by_group["rows"]), ("agent", by_agent["rows"])):
        params = {"by": by, "format": "csv"}
        if by == "group":
            params.update({"from": "2000-01-01", "to": "2100-01-01"})
        async with api.http.get(
            api.server.url + PREFIX + "/reports",
            params=params,
            headers={"Authorization": f"Bearer {token(*ROOT)}"},
        ) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/csv"
            assert f"kefu-report-{by}.csv" in resp.headers["Content-Disposition"]
            text = await resp.text()
        table = list(csv.reader(io.StringIO(text)))
        assert table[0] == list(json_rows[0])
        assert table[1:] == [["" if v is None else str(v) for v in r.values()] for r in json_rows]


async def test_report_ranges_and_validation(api: Api, server: Server, connect: Connect) -> None:
    await _history(api, server, connect)
    day = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)
    tomorrow = day.isoformat()
    later = await api.get("/reports", **{"from": tomorrow, "to": "2100-01-01T00:00:00Z"})
    assert later["rows"] == []
    midnight = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    assert later["start"] == int(midnight.timestamp()) * 1000
    assert later["end"] == 4_102_444_800_000
    now = ids.now_ms()
    by_ms = await api.get(
        "/reports", by="agent", **{"from": str(now - 3_600_000), "to": str(now + 1)}
    )
    assert by_ms["start"] == now - 3_600_000 and by_ms["end"] == now + 1
    assert [r["key"] for r in by_ms["rows"]] == ["ag1"]
    iso = await api.get("/reports", **{"from": "2000-01-01T00:00:00+00:00", "to": "2100-01-01"})
    assert iso["start"] == 946_684_800_000
    assert [r["conversations"] for r in iso["rows"]] == [3, 1]
    before = await api.get("/reports", **{"from": "2000-01-01", "to": "2001-01-01"})
    assert before["rows"] == []

    for params in (
        {"by": "bogus"},
        {"by": "customer"},
        {"from": "2030-01-01", "to": "2020-01-01"},
        {"from": "2020-01-01", "to": "2020-01-01"},
        {"from": str(now), "to": str(now)},
        {"from": tomorrow},  # after the default end (now)
        {"from": "yesterday"},
        {"to": "2020-13-45"},
    ):
        await api.error("GET", "/reports", params=params, status=400, code="invalid_argument")
