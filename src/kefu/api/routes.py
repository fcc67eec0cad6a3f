"""The REST API under ``/api/v1``: one table of routes, served by aiohttp and described by
the OpenAPI document built from the same table (so the two cannot drift apart).

Every route takes the WebSocket's JWT as ``Authorization: Bearer <token>`` and names the
roles it admits; anyone else gets 403 ``forbidden``. Errors are JSON
``{"error": {"code": ..., "message": ...}}`` with the codes of docs/protocol.md.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from kefu import ids
from kefu.api import schemas as s
from kefu.auth import verify_token
from kefu.broker import LocalBroker
from kefu.cluster.ring import Ring
from kefu.config import advertised_url
from kefu.desk import Desk
from kefu.errors import AuthError, ErrorCode, Forbidden, InvalidArgument, KefuError, NotFound
from kefu.model import (
    Agent,
    CannedResponse,
    Conversation,
    ConversationState,
    Group,
    Principal,
    Role,
    RoutingMode,
)
from kefu.protocol import frames as f
from kefu.reports import report, to_csv
from kefu.store.base import ConversationFilter
from kefu.views import conversation_info, message_frame

DESK_KEY = web.AppKey("desk", Desk)
#: Unix ms when the routes were added: the node's start in embedded mode.
STARTED_KEY = web.AppKey("started", int)
PREFIX = "/api/v1"
MAX_LIMIT = 200

T = TypeVar("T", bound=msgspec.Struct)
Handler = Callable[[web.Request, Principal], Awaitable[web.StreamResponse]]

STATUS = {
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.INVALID_TOKEN: 401,
    ErrorCode.TOKEN_EXPIRED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_MEMBER: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.BAD_FRAME: 400,
    ErrorCode.BAD_JSON: 400,
    ErrorCode.INVALID_TRANSITION: 409,
    ErrorCode.ALREADY_RATED: 409,
    ErrorCode.CONFLICT: 409,
    ErrorCode.AGENT_UNAVAILABLE: 409,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.STORE_UNAVAILABLE: 503,
    ErrorCode.SHUTTING_DOWN: 503,
}

STAFF = frozenset({Role.AGENT, Role.ADMIN})
ADMIN = frozenset({Role.ADMIN})
EVERYONE = frozenset({Role.CUSTOMER, Role.AGENT, Role.ADMIN})


@dataclasses.dataclass(frozen=True, slots=True)
class Param:
    name: str
    description: str
    kind: str = "string"  # string, integer
    where: str = "query"  # query or path
    enum: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str  # under PREFIX, aiohttp syntax: /conversations/{conv}
    handler: Handler
    roles: frozenset[Role]
    summary: str
    params: tuple[Param, ...] = ()
    body: type[msgspec.Struct] | None = None
    response: type[msgspec.Struct] | None = None
    status: int = 200
    csv: bool = False


def error_response(code: ErrorCode, message: str, status: int | None = None) -> web.Response:
    body = msgspec.json.encode(s.ErrorResponse(error=s.ErrorBody(code=code.value, message=message)))
    return web.Response(
        body=body, status=status or STATUS.get(code, 500), content_type="application/json"
    )


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(value), status=status, content_type="application/json"
    )


def principal_of(request: web.Request) -> Principal:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("send Authorization: Bearer <token>", code=ErrorCode.UNAUTHENTICATED)
    desk = request.app[DESK_KEY]
    return verify_token(desk.config.jwt_secret, token.strip())


def wrap(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            principal = principal_of(request)
            if principal.role not in route.roles:
                roles = ", ".join(sorted(r.value for r in route.roles))
                raise Forbidden(f"{route.method} {PREFIX}{route.path} is for: {roles}")
            return await route.handler(request, principal)
        except KefuError as exc:
            request.app[DESK_KEY].metrics.error_code(exc.code.value).inc()
            response = error_response(exc.code, exc.message)
            if exc.retry_after is not None:
                response.headers["Retry-After"] = str(max(1, round(exc.retry_after)))
            return response

    return handle


async def body_of(request: web.Request, kind: type[T]) -> T:
    raw = await request.read()
    try:
        data = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise KefuError(f"body is not JSON: {exc}", code=ErrorCode.BAD_JSON) from exc
    try:
        return msgspec.convert(data, type=kind)
    except msgspec.ValidationError as exc:
        raise KefuError(f"invalid body: {exc}", code=ErrorCode.BAD_FRAME) from exc


def _int(request: web.Request, name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidArgument(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise InvalidArgument(f"{name} must be {low}..{high}")
    return value


def _cursor(raw: str | None) -> tuple[int, str] | None:
    """A conversation-list cursor, ``<updated_at>.<id>`` (next_before of a page)."""
    if not raw:
        return None
    ts, _, conv = raw.partition(".")
    if not ts.isdigit() or not conv:
        raise InvalidArgument("before must be the next_before of the previous page")
    return int(ts), conv


def _time(request: web.Request, name: str) -> int | None:
    """A time parameter: Unix milliseconds or ISO 8601 (a date, or a date and time)."""
    raw = request.query.get(name)
    if not raw:
        return None
    if raw.isdigit():
        return int(raw)
    try:
        when = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidArgument(f"{name} must be Unix ms or ISO 8601") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


# -- conversations ---------------------------------------------------------------------------


async def _readable(desk: Desk, principal: Principal, conv_id: str) -> Conversation:
    conv = await desk.store.get_conversation(conv_id)
    if conv is None:
        raise NotFound(f"conversation {conv_id!r} does not exist")
    if not await desk.can_read(principal, conv):
        raise Forbidden(f"conversation {conv_id!r} is not yours")
    return conv


async def list_conversations(request: web.Request, principal: Principal) -> web.Response:
    desk = request.app[DESK_KEY]
    states: tuple[ConversationState, ...] = ()
    if request.query.get("state"):
        try:
            states = tuple(ConversationState(v) for v in request.query["state"].split(","))
        except ValueError:
            raise InvalidArgument(
                "state must be queued, assigned, waiting, resolved, closed"
            ) from None
    where = ConversationFilter(
        states=states,
        group_id=request.query.get("group") or None,
        agent_id=request.query.get("agent") or None,
        customer_id=request.query.get("customer") or None,
        text=request.query.get("q") or None,
        include_internal=principal.role is not Role.CUSTOMER,
        after=_cursor(request.query.get("before")),
    )
    if principal.role is Role.CUSTOMER:
        if where.customer_id not in (None, principal.user_id):
            raise Forbidden("customers list their own conversations only")
        where = dataclasses.replace(where, customer_id=principal.user_id)
    elif principal.role is Role.AGENT:
        if where.agent_id not in (None, principal.user_id):
            raise Forbidden("agents list their own conversations only")
        where = dataclasses.replace(where, agent_id=principal.user_id)
    limit = _int(request, "limit", 50, 1, MAX_LIMIT)
    assert limit is not None
    found = await desk.store.search_conversations(where, limit=limit + 1)
    more = len(found) > limit
    found = found[:limit]
    return json_response(
        s.ConversationList(
            conversations=[conversation_info(c) for c in found],
            next_before=f"{found[-1].updated_at}.{found[-1].id}" if more and found else None,
        )
    )


async def get_conversation(request: web.Request, principal: Principal) -> web.Response:
    desk = request.app[DESK_KEY]
    conv = await _readable(desk, principal, request.match_info["conv"])
    last = await desk.store.last_seq(conv.id)
    return json_response(
        s.ConversationDetail(
            conversation=conversation_info(conv, last),
            labels=list(conv.labels),
            csat_comment=conv.csat_comment,
            timeline={
                "created_at": conv.created_at,
                "first_assigned_at": conv.first_assigned_at,
                "assigned_at": conv.assigned_at,
                "accepted_at": conv.accepted_at,
                "first_response_at": conv.first_response_at,
                "resolved_at": conv.resolved_at,
                "closed_at": conv.closed_at,
            },
        )
    )


async def list_messages(request: web.Request, principal: Principal) -> web.Response:
    desk = request.app[DESK_KEY]
    conv = await _readable(desk, principal, request.match_info["conv"])
    limit = _int(request, "limit", 50, 1, MAX_LIMIT)
    assert limit is not None
    after = _int(request, "after_seq", None, 0, 2**53)
    before = _int(request, "before_seq", None, 0, 2**53)
    if after is not None and before is not None:
        raise InvalidArgument("give after_seq or before_seq, not both")
    customer = principal.role is Role.CUSTOMER
    while True:
        if after is not None:
            rows = await desk.store.messages_after(conv.id, after, limit + 1)
            has_more = len(rows) > limit
            rows = rows[:limit]
            edge = rows[-1].seq if rows else None  # the next page starts after it
        else:
            rows = await desk.store.messages_before(conv.id, before, limit + 1)
            has_more = len(rows) > limit
            rows = rows[1:] if has_more else rows
            edge = rows[0].seq if rows else None  # the next page ends before it
        last = rows[-1].seq if rows else 0
        if customer:
            rows = [m for m in rows if not m.internal]
        # A customer's page of private notes only would leave nothing to page on from:
        # go on instead.
        if rows or not has_more or edge is None:
            break
        if after is not None:
            after = edge
        else:
            before = edge
    return json_response(
        s.MessagePage(
            conv=conv.id,
            messages=[message_frame(m) for m in rows],
            has_more=has_more,
            last_seq=last,
        )
    )


# -- groups ----------------------------------------------------------------------------------


def _group_out(g: Group) -> s.GroupOut:
    return s.GroupOut(
        id=g.id,
        name=g.name,
        mode=g.mode.value,
        welcome=g.welcome,
        max_queue=g.max_queue,
        max_wait=g.max_wait,
        schedule=g.schedule,
        out_of_hours_message=g.out_of_hours_message,
        created_at=g.created_at,
    )


async def list_groups(request: web.Request, principal: Principal) -> web.Response:
    desk = request.app[DESK_KEY]
    return json_response([_group_out(g) for g in sorted(desk.groups.values(), key=lambda g: g.id)])


async def create_group(request: web.Request, principal: Principal) -> web.Response:
    desk = request.app[DESK_KEY]
    body = await body_of(request, s.GroupIn)
    if body.id in desk.groups:
        raise KefuError(f"group {body.id!r} exists: PATCH it", code=ErrorCode.CONFLICT)
    group = Group(
        id=body.id,
        name=body.name,
        mode=RoutingMode(body.mode),
        welcome=body.welcome,
        max_queue=body.max_queue,
        max_wait=body.max_wait,
        schedule=body.schedule,
        out_of_hours_message=body.out_of_hours_message,
    )
    return json_response(_group_out(await desk.save_group(group)), status=201)


async def update_group(request: web.Request, principal: Principal) -> web.Response:
    desk = request.app[DESK_KEY]
    current = desk.group(request.match_info["group"])
    patch = msgspec.structs.asdict(await body_of(request, s.GroupPatch))
    changes = {k: v for k, v in patch.items() if v is not msgspec.UNSET}
    if "mode" in changes:
        changes["mode"] = RoutingMode(changes["mode"])
    return json_response(_group_out(await desk.save_group(dataclasses.replace(current, **changes))))


# -- agents ----------------------------------------------------------------------------------


async def _agent_out(desk: Desk, agent: Agent) -> s.AgentOut:
    state = await desk.routing.agent(agent.id)
    return s.AgentOut(
        id=agent.id,
        name=agent.name,
        capacity=agent.capacity,
        groups=list(agent.groups),
        created_at=agent.created_at,
        status="offline" if state is None else state.effective.value,
        load=0 if state is None else state.load,
    )


async def list_agents(request: web.Request, principal: Principal) -> web.Response:
    desk = request.app[DESK_KEY]
    agents = sorted(desk.agents.values(), key=lambda a: a.id)
    return json_response([await _agent_out(desk, a) for a in agents])


async def create_agent(request: web.Request, principal: Principal) -> web.Response:
    desk = request.app[DESK_KEY]
    body = await body_of(request, s.AgentIn)
    if body.id in desk.agents:
        raise KefuError(f"agent {body.id!r} exists: PATCH it", code=ErrorCode.CONFLICT)
    agent = Agent(id=body.id, name=body.name, capacity=body.capacity, groups=tuple(body.groups))
    return json_response(await _agent_out(desk, await desk.save_agent(agent)), status=201)


async def update_agent(request: web.Request, principal: Principal) -> web.Response:
    desk = request.app[DESK_KEY]
    agent_id = request.match_info["agent"]
    current = desk.agents.get(agent_id)
    if current is None:
        raise NotFound(f"agent {agent_id!r} does not exist")
    patch = msgspec.structs.asdict(await body_of(request, s.AgentPatch))
    changes = {k: v for k, v in patch.items() if v is not msgspec.UNSET}
    if "groups" in changes:
        changes["groups"] = tuple(changes["groups"])
    saved = await desk.save_agent(dataclasses.replace(current, **changes))
    return json_response(await _agent_out(desk, saved))


# -- canned responses --------------------------------------------------------------------------


def _canned_out(c: CannedResponse) -> s.CannedOut:
    return s.CannedOut(
        id=c.id, group=c.group_id, shortcut=c.shortcut, text=c.text, created_at=c.created_at
    )


async def list_canned(request: web.Request, principal: Principal) -> web.Response:
    desk = request.app[DESK_KEY]
    found = await desk.canned(principal, request.query.get("group") or None)
    return json_response([_canned_out(c) for c in found])


async def create_canned(request: web.Request, principal: Principal) -> web.Response:
    desk = request.app[DESK_KEY]
    body = await body_of(request, s.CannedIn)
    if body.group is not None:
        desk.group(body.group)
    saved = await desk.store.save_canned(
        CannedResponse(id=ids.new_id(), group_id=body.group, shortcut=body.shortcut, text=body.text)
    )
    return json_response(_canned_out(saved), status=201)


async def delete_canned(request: web.Request, principal: Principal) -> web.Response:
    desk = request.app[DESK_KEY]
    if not await desk.store.delete_canned(request.match_info["canned"]):
        raise NotFound(f"canned response {request.match_info['canned']!r} does not exist")
    return json_response(s.Deleted(deleted=True))


# -- statistics and reports ----------------------------------------------------------------------


async def live_stats(request: web.Request, principal: Principal) -> web.Response:
    desk = request.app[DESK_KEY]
    return json_response(msgspec.convert(await desk.live_stats(), s.LiveStats))


async def get_report(request: web.Request, principal: Principal) -> web.StreamResponse:
    desk = request.app[DESK_KEY]
    by = request.query.get("by", "group")
    if by not in ("group", "agent"):
        raise InvalidArgument("by must be group or agent")
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise InvalidArgument("format must be json or csv")
    end = _time(request, "to")
    if end is None:
        end = ids.now_ms()
    start = _time(request, "from")
    if start is None:
        start = end - 7 * 86_400_000
    if start >= end:
        raise InvalidArgument("from must be before to")
    convs = await desk.store.search_conversations(
        ConversationFilter(created_from=start, created_to=end), limit=1_000_000
    )
    rows = report(convs, by, desk.settings.default_group)
    if fmt == "csv":
        return web.Response(
            text=to_csv(rows),
            content_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="kefu-report-{by}.csv"'},
        )
    out = s.Report(
        by=by,
        start=start,
        end=end,
        rows=rows,
    )
    return json_response(out)


# -- the cluster -----------------------------------------------------------------------------------


def _own_url(request: web.Request, desk: Desk) -> str:
    """This node's advertised URL (with the bound port when the configured one is 0)."""
    port = desk.config.port
    if port == 0 and request.transport is not None:
        sockname = request.transport.get_extra_info("sockname")
        if isinstance(sockname, tuple) and len(sockname) >= 2:
            port = int(sockname[1])
    return advertised_url(desk.config, port)


async def cluster_info(request: web.Request, principal: Principal) -> web.Response:
    desk = request.app[DESK_KEY]
    config = desk.config
    from kefu.cluster.broker import RedisBroker  # only a cluster node has loaded it
    from kefu.cluster.view import nodes_of

    broker = desk.broker
    if not isinstance(broker, RedisBroker):
        weight = config.cluster.node_weight
        ring = Ring({config.node_id: weight}, vnodes=config.cluster.ring_vnodes)
        own = s.ClusterNode(
            id=config.node_id,
            url=_own_url(request, desk),
            weight=weight,
            connections=len(broker.hub) if isinstance(broker, LocalBroker) else 0,
            started=request.app[STARTED_KEY],
            incarnation=None,
        )
        return json_response(
            s.ClusterInfo(
                mode="embedded", node=config.node_id, ring_version=ring.version, nodes=[own]
            )
        )
    membership = broker.membership
    ring = membership.ring
    infos = nodes_of(membership.member_info, default_weight=config.cluster.node_weight)
    nodes = []
    for node in ring.nodes:
        info = infos.get(node)
        if node == config.node_id:
            nodes.append(
                s.ClusterNode(
                    id=node,
                    url=membership.url,
                    weight=ring.weights[node],
                    connections=len(broker.hub),
                    started=membership.started,
                    incarnation=membership.incarnation,
                )
            )
        else:
            nodes.append(
                s.ClusterNode(
                    id=node,
                    url=info.url if info else "",
                    weight=ring.weights[node],
                    connections=info.connections if info else 0,
                    started=info.started if info else 0,
                    incarnation=info.incarnation if info else None,
                )
            )
    return json_response(
        s.ClusterInfo(mode="cluster", node=config.node_id, ring_version=ring.version, nodes=nodes)
    )


# -- the table -------------------------------------------------------------------------------------

CONV = Param("conv", "Conversation id", where="path")
LIMIT = Param("limit", f"Page size, 1..{MAX_LIMIT} (default 50)", kind="integer")

ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/conversations",
        list_conversations,
        EVERYONE,
        "List conversations, most recently changed (state, agent, labels) first "
        "(customers: theirs; agents: theirs)",
        params=(
            Param("state", "Comma-separated states"),
            Param("group", "Skill group id"),
            Param("agent", "Agent id"),
            Param("customer", "Customer id"),
            Param("q", "Text that a message of the conversation contains"),
            Param("before", "Paging cursor: next_before of the previous page"),
            LIMIT,
        ),
        response=s.ConversationList,
    ),
    Route(
        "GET",
        "/conversations/{conv}",
        get_conversation,
        EVERYONE,
        "One conversation with its timeline",
        params=(CONV,),
        response=s.ConversationDetail,
    ),
    Route(
        "GET",
        "/conversations/{conv}/messages",
        list_messages,
        EVERYONE,
        "A page of history (latest first page; before_seq or after_seq to page)",
        params=(
            CONV,
            Param("before_seq", "Messages before this seq", kind="integer"),
            Param("after_seq", "Messages after this seq", kind="integer"),
            LIMIT,
        ),
        response=s.MessagePage,
    ),
    Route("GET", "/groups", list_groups, STAFF, "List skill groups", response=s.GroupOut),
    Route(
        "POST",
        "/groups",
        create_group,
        ADMIN,
        "Create a skill group",
        body=s.GroupIn,
        response=s.GroupOut,
        status=201,
    ),
    Route(
        "PATCH",
        "/groups/{group}",
        update_group,
        ADMIN,
        "Change a skill group (mode, limits, schedule, messages)",
        params=(Param("group", "Group id", where="path"),),
        body=s.GroupPatch,
        response=s.GroupOut,
    ),
    Route(
        "GET",
        "/agents",
        list_agents,
        ADMIN,
        "List agents with live status and load",
        response=s.AgentOut,
    ),
    Route(
        "POST",
        "/agents",
        create_agent,
        ADMIN,
        "Create an agent",
        body=s.AgentIn,
        response=s.AgentOut,
        status=201,
    ),
    Route(
        "PATCH",
        "/agents/{agent}",
        update_agent,
        ADMIN,
        "Change an agent's capacity, groups or name",
        params=(Param("agent", "Agent id", where="path"),),
        body=s.AgentPatch,
        response=s.AgentOut,
    ),
    Route(
        "GET",
        "/canned-responses",
        list_canned,
        STAFF,
        "Canned responses (agents: their groups' and the global ones)",
        params=(Param("group", "Only this group's (and the global ones)"),),
        response=s.CannedOut,
    ),
    Route(
        "POST",
        "/canned-responses",
        create_canned,
        ADMIN,
        "Create a canned response (for a group, or global without one)",
        body=s.CannedIn,
        response=s.CannedOut,
        status=201,
    ),
    Route(
        "DELETE",
        "/canned-responses/{canned}",
        delete_canned,
        ADMIN,
        "Delete a canned response",
        params=(Param("canned", "Canned response id", where="path"),),
        response=s.Deleted,
    ),
    Route(
        "GET",
        "/stats/live",
        live_stats,
        ADMIN,
        "Queue length and longest wait per group; agents online and their load",
        response=s.LiveStats,
    ),
    Route(
        "GET",
        "/reports",
        get_report,
        ADMIN,
        "Per group or per agent: first response, resolution and wait times, "
        "abandonment rate, CSAT (JSON or CSV)",
        params=(
            Param("by", "group or agent (default group)", enum=("group", "agent")),
            Param("from", "Start: Unix ms or ISO 8601 (default: 7 days before to)"),
            Param("to", "End, exclusive: Unix ms or ISO 8601 (default: now)"),
            Param("format", "json or csv (default json)", enum=("json", "csv")),
        ),
        response=s.Report,
        csv=True,
    ),
    Route(
        "GET",
        "/cluster",
        cluster_info,
        ADMIN,
        "The cluster as this node sees it: mode, ring version, and the live nodes with their "
        "URL, weight, connections and start",
        response=s.ClusterInfo,
    ),
)


def add_routes(app: web.Application, desk: Desk) -> None:
    app[DESK_KEY] = desk
    app[STARTED_KEY] = ids.now_ms()
    for route in ROUTES:
        app.router.add_route(route.method, PREFIX + route.path, wrap(route))


# Frames the REST schemas reuse, exported for the OpenAPI components.
SHARED = (f.ConversationInfo, f.Message)
