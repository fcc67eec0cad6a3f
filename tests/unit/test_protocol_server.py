"""ServerConnection, bytes in and events out: no sockets, no event loop."""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kefu.errors import RETRYABLE_CODES, CloseCode, ErrorCode
from kefu.protocol import frames as f
from kefu.protocol.server import Rejected, ServerConnection, State, encode, error_frame

IMAGE = {"url": "https://img.example/a.png", "width": 640, "height": 480}
CARD = {
    "id": "order-1",
    "title": "A used bicycle",
    "price": "120.50",
    "image_url": "https://img.example/bike.png",
}

#: One valid frame per op, with the Struct it must decode to.
VALID: list[tuple[dict[str, Any], type[msgspec.Struct]]] = [
    ({"op": "auth", "token": "t0k3n"}, f.Auth),
    ({"op": "ping"}, f.Ping),
    (
        {"op": "send", "conv": "c1", "client_msg_id": "m1", "type": "text", "body": {"text": "hi"}},
        f.Send,
    ),
    ({"op": "send", "conv": "c1", "client_msg_id": "m2", "type": "image", "body": IMAGE}, f.Send),
    (
        {"op": "send", "conv": "c1", "client_msg_id": "m3", "type": "order_card", "body": CARD},
        f.Send,
    ),
    (
        {"op": "send", "conv": "c1", "client_msg_id": "m4", "type": "listing_card", "body": CARD},
        f.Send,
    ),
    ({"op": "sync", "conv": "c1", "after_seq": 3, "limit": 10}, f.Sync),
    ({"op": "history", "conv": "c1", "before_seq": 9, "limit": 5}, f.History),
    ({"op": "read", "conv": "c1", "seq": 4}, f.Read),
    ({"op": "typing", "conv": "c1"}, f.Typing),
    ({"op": "open", "customer_id": "cust-1", "group": "g"}, f.Open),
    ({"op": "open", "context": CARD, "context_type": "order_card"}, f.Open),
    ({"op": "convs"}, f.ListConversations),
]


def _bytes(frame: Any) -> bytes:
    return json.dumps(frame).encode()


def fresh() -> ServerConnection:
    return ServerConnection(max_body_chars=100)


def authed() -> ServerConnection:
    conn = fresh()
    conn.authenticated()
    return conn


def rejected(event: object, code: ErrorCode, request_id: object = None) -> Rejected:
    assert isinstance(event, Rejected), event
    assert event.error.code == code.value, event
    assert event.error.id == request_id, event
    return event


# -- every op parses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "cls"), VALID, ids=lambda v: v.get("op") if isinstance(v, dict) else None
)
@pytest.mark.parametrize("request_id", [None, 7, "req-7"])
def test_every_op_parses(frame: dict[str, Any], cls: type[msgspec.Struct], request_id: Any) -> None:
    if request_id is not None:
        frame = {**frame, "id": request_id}
    conn = fresh() if cls is f.Auth else authed()
    event = conn.receive_text(_bytes(frame))
    assert isinstance(event, cls), event
    assert event.id == request_id
    # str input works as well as bytes
    assert isinstance(conn.receive_text(json.dumps(frame)), cls)


def test_send_body_is_canonicalised() -> None:
    raw = b'{ "op":"send", "conv":"c1", "client_msg_id":"m", "type":"image", "body": {"height": 2, "width": 3,  "url":"http://x/y"} }'
    event = authed().receive_text(raw)
    assert isinstance(event, f.Send)
    assert bytes(event.body) == b'{"url":"http://x/y","width":3,"height":2}'


def test_card_currency_defaults_and_fields_decode() -> None:
    event = authed().receive_text(
        _bytes(
            {"op": "send", "conv": "c", "client_msg_id": "m", "type": "order_card", "body": CARD}
        )
    )
    assert isinstance(event, f.Send)
    assert json.loads(bytes(event.body))["currency"] == "CNY"


def test_defaults_of_sync_and_history() -> None:
    sync = authed().receive_text(b'{"op":"sync","conv":"c"}')
    assert isinstance(sync, f.Sync)
    assert (sync.after_seq, sync.limit) == (0, 100)
    hist = authed().receive_text(b'{"op":"history","conv":"c"}')
    assert isinstance(hist, f.History)
    assert (hist.before_seq, hist.limit) == (None, 50)


def test_ping_and_auth_are_allowed_before_auth() -> None:
    conn = fresh()
    assert isinstance(conn.receive_text(b'{"op":"ping","id":1}'), f.Ping)
    assert isinstance(conn.receive_text(b'{"op":"auth","token":"x"}'), f.Auth)
    assert conn.state is State.AWAITING_AUTH  # the node decides, not the protocol


# -- bad JSON and bad envelopes ------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"not json",
        b'{"op":"ping"',
        b'{"op":"ping"}}',
        b"{'op':'ping'}",
        b"nul",
    ],
)
@pytest.mark.parametrize("make", [fresh, authed])
def test_invalid_json_is_bad_json(data: bytes, make: Any) -> None:
    event = make().receive_text(data)
    rejected(event, ErrorCode.BAD_JSON)
    assert event.close is None


def invalid_utf8(event: object) -> None:
    """bad_json "text frame is not valid UTF-8", then close 1007 (RFC 6455 section 8.1)."""
    assert isinstance(event, Rejected), event
    assert event.error.code == ErrorCode.BAD_JSON.value, event
    assert event.error.message == "text frame is not valid UTF-8", event
    assert event.error.retryable is False
    assert event.error.id is None
    assert event.close is CloseCode.INVALID_PAYLOAD


@pytest.mark.parametrize(
    "data",
    [
        b'{"op":"ping","id":"\xed\xa0\x80"}',  # a UTF-16 surrogate encoded as UTF-8
        b'{"op":"\xc3"}',  # a truncated multi-byte sequence
        b'{"op":"ping","\xff":1}',
        b'{"op":"auth","token":"abc\xe2\x82"}',
        b'{"op":"open","customer_id":"c\xff"}',
    ],
)
@pytest.mark.parametrize("make", [fresh, authed])
def test_invalid_utf8_inside_strings_is_bad_json_then_1007(data: bytes, make: Any) -> None:
    """Text frames must be UTF-8; a bad byte inside a JSON string fails the connection."""
    invalid_utf8(make().receive_text(data))


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xfe",  # not UTF-8 (and so not JSON) from the first byte
        b'{"op":"ping"}\xff',  # a stray byte after the object
        b'{"op":"send","id":1,"conv":"c","client_msg_id":"m","type":"text","body":{"text":"\xed\xa0\x80"}}',
        b'{"op":"ping","x":"\xff"}',  # inside an unknown field
    ],
    ids=["leading-bytes", "trailing-byte", "send-body", "unknown-field"],
)
def test_invalid_utf8_anywhere_in_a_text_frame_is_bad_json_then_1007(data: bytes) -> None:
    """docs/protocol.md section 3: *any* text message that is not valid UTF-8."""
    invalid_utf8(authed().receive_text(data))


@pytest.mark.parametrize(
    "data",
    [
        b'{"op":"bogus","id":' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"op":"send","conv":"c","client_msg_id":"m","type":"text","body":'
        + b"[" * 5000
        + b"]" * 5000
        + b"}",
        b'{"op":"open","context":' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}",
    ],
    ids=["deep-id", "deep-body", "deep-context"],
)
@pytest.mark.parametrize("make", [fresh, authed])
def test_deeply_nested_json_is_bad_frame_not_raised(data: bytes, make: Any) -> None:
    """Well under the 64 KiB frame limit, nesting must not blow the decoder's stack."""
    assert len(data) < 64 * 1024
    event = make().receive_text(data)
    assert isinstance(event, Rejected), event
    assert event.error.code == ErrorCode.BAD_FRAME.value
    assert event.close is None  # the connection stays open


@pytest.mark.parametrize("depth", [5000, 20000])
@pytest.mark.parametrize("make", [fresh, authed])
def test_deeply_nested_send_body_is_bad_frame(depth: int, make: Any) -> None:
    """Nesting where the decoder recurses (a raw body) is reported, not raised."""
    data = b'{"op":"send","conv":"c","client_msg_id":"m","type":"text","body":'
    data += b"[" * depth + b"]" * depth + b"}"
    event = make().receive_text(data)
    assert isinstance(event, Rejected), event
    assert event.error.code == ErrorCode.BAD_FRAME.value
    assert event.error.message == "JSON nested too deeply"
    assert event.close is None


@pytest.mark.parametrize("data", [b"[]", b"[1,2]", b"null", b"1", b'"ping"', b"true", b"1.5"])
def test_non_object_json_is_bad_frame(data: bytes) -> None:
    rejected(authed().receive_text(data), ErrorCode.BAD_FRAME)


@pytest.mark.parametrize(
    ("frame", "request_id"),
    [
        ({}, None),
        ({"id": 5}, 5),
        ({"id": "r", "conv": "c"}, "r"),
        ({"op": None, "id": 1}, 1),
        ({"op": 3, "id": "x"}, "x"),
        ({"op": ["ping"]}, None),
    ],
)
def test_missing_or_non_string_op_is_bad_frame(frame: dict[str, Any], request_id: Any) -> None:
    rejected(authed().receive_text(_bytes(frame)), ErrorCode.BAD_FRAME, request_id)


@pytest.mark.parametrize("op", ["bogus", "PING", "Send", "", "hello", "ack", "error", "x" * 500])
@pytest.mark.parametrize("make", [fresh, authed])
def test_unknown_op(op: str, make: Any) -> None:
    event = rejected(make().receive_text(_bytes({"op": op, "id": 9})), ErrorCode.UNKNOWN_OP, 9)
    assert len(event.error.message) < 100  # the op is quoted, truncated


# -- bad fields, with the request id echoed ------------------------------------------------

BAD_FIELDS: list[dict[str, Any]] = [
    {"op": "auth"},  # missing token
    {"op": "auth", "token": ""},
    {"op": "auth", "token": 42},
    {"op": "auth", "token": "x" * 8193},
    {"op": "ping", "extra": 1},  # unknown field
    {"op": "send", "conv": "c", "type": "text", "body": {"text": "x"}},  # no client_msg_id
    {"op": "send", "client_msg_id": "m", "type": "text", "body": {"text": "x"}},  # no conv
    {"op": "send", "conv": "c", "client_msg_id": "m", "type": "text"},  # no body
    {"op": "send", "conv": "c", "client_msg_id": "m", "body": {"text": "x"}},  # no type
    {"op": "send", "conv": 5, "client_msg_id": "m", "type": "text", "body": {"text": "x"}},
    {"op": "send", "conv": "", "client_msg_id": "m", "type": "text", "body": {"text": "x"}},
    {"op": "send", "conv": "a b", "client_msg_id": "m", "type": "text", "body": {"text": "x"}},
    {"op": "send", "conv": "c" * 65, "client_msg_id": "m", "type": "text", "body": {"text": "x"}},
    {"op": "send", "conv": "c", "client_msg_id": "", "type": "text", "body": {"text": "x"}},
    {"op": "send", "conv": "c", "client_msg_id": 1, "type": "text", "body": {"text": "x"}},
    {"op": "send", "conv": "c", "client_msg_id": "m", "type": "video", "body": {"text": "x"}},
    {"op": "send", "conv": "c", "client_msg_id": "m", "type": "system", "body": {"event": "x"}},
    {"op": "sync"},
    {"op": "sync", "conv": "c", "after_seq": -1},
    {"op": "sync", "conv": "c", "after_seq": "3"},
    {"op": "sync", "conv": "c", "after_seq": 1.5},
    {"op": "sync", "conv": "c", "limit": 0},
    {"op": "sync", "conv": "c", "limit": 1001},
    {"op": "history", "conv": "c", "before_seq": -2},
    {"op": "read", "conv": "c"},
    {"op": "read", "conv": "c", "seq": None},
    {"op": "read", "conv": "c", "seq": 2**53 + 1},
    {"op": "typing"},
    {"op": "typing", "conv": ["c"]},
    {"op": "open", "customer_id": ""},
    {"op": "open", "customer_id": 17},
    {"op": "open", "context_type": "text"},
    {"op": "open", "context": {"id": "x"}, "context_type": "order_card"},
    {"op": "convs", "limit": 3},
]


@pytest.mark.parametrize("frame", BAD_FIELDS, ids=lambda fr: json.dumps(fr)[:60])
@pytest.mark.parametrize("request_id", [None, 12, "abc"])
def test_missing_or_mistyped_fields_are_bad_frame(frame: dict[str, Any], request_id: Any) -> None:
    if request_id is not None:
        frame = {**frame, "id": request_id}
    conn = fresh() if frame["op"] == "auth" else authed()
    event = rejected(conn.receive_text(_bytes(frame)), ErrorCode.BAD_FRAME, request_id)
    assert event.close is None
    assert event.error.message


@pytest.mark.parametrize("bad_id", [True, 1.5, "x" * 65, [1], {"a": 1}])
def test_bad_request_id_is_bad_frame_without_echo(bad_id: Any) -> None:
    rejected(authed().receive_text(_bytes({"op": "ping", "id": bad_id})), ErrorCode.BAD_FRAME)


# -- bodies, per message type --------------------------------------------------------------


def _send(type_: str, body: Any) -> bytes:
    return _bytes(
        {"op": "send", "id": "s", "conv": "c", "client_msg_id": "m", "type": type_, "body": body}
    )


BAD_BODIES = [
    ("text", {"text": ""}),
    ("text", {}),
    ("text", {"text": 5}),
    ("text", {"text": "x", "extra": True}),
    ("text", "just a string"),
    ("text", None),
    ("image", {**IMAGE, "url": "ftp://img.example/a.png"}),
    ("image", {**IMAGE, "url": "javascript:alert(1)"}),
    ("image", {**IMAGE, "url": ""}),
    ("image", {**IMAGE, "url": "https://x/" + "a" * 2048}),
    ("image", {**IMAGE, "width": 0}),
    ("image", {**IMAGE, "height": 100_001}),
    ("image", {**IMAGE, "width": "640"}),
    ("image", {"url": IMAGE["url"], "width": 1}),
    ("order_card", {**CARD, "price": "-1"}),
    ("order_card", {**CARD, "price": "12.345"}),
    ("order_card", {**CARD, "price": "abc"}),
    ("order_card", {**CARD, "price": 12}),
    ("order_card", {**CARD, "price": "1" * 13}),
    ("listing_card", {**CARD, "price": "1e5"}),
    ("listing_card", {**CARD, "currency": "cny"}),
    ("listing_card", {**CARD, "title": ""}),
    ("listing_card", {**CARD, "title": "t" * 201}),
    ("listing_card", {**CARD, "image_url": "file:///etc/passwd"}),
    ("listing_card", {k: v for k, v in CARD.items() if k != "id"}),
]


@pytest.mark.parametrize(("type_", "body"), BAD_BODIES, ids=lambda v: str(v)[:40])
def test_bad_body_per_type(type_: str, body: Any) -> None:
    rejected(authed().receive_text(_send(type_, body)), ErrorCode.BAD_FRAME, "s")


def test_text_body_length_limit() -> None:
    conn = authed()  # max_body_chars=100
    assert isinstance(conn.receive_text(_send("text", {"text": "é" * 100})), f.Send)
    event = rejected(
        conn.receive_text(_send("text", {"text": "é" * 101})), ErrorCode.BAD_FRAME, "s"
    )
    assert "100" in event.error.message


def test_good_prices() -> None:
    for price in ("0", "1", "12.5", "999999999999.99"):
        assert isinstance(
            authed().receive_text(_send("order_card", {**CARD, "price": price})), f.Send
        )


def test_client_cannot_send_system_messages() -> None:
    event = authed().receive_text(_send("system", {"event": "closed", "data": {}}))
    rejected(event, ErrorCode.BAD_FRAME, "s")


# -- connection state ----------------------------------------------------------------------


@pytest.mark.parametrize(("frame", "cls"), [v for v in VALID if v[1] not in (f.Auth, f.Ping)])
def test_frames_before_auth_are_unauthenticated(frame: dict[str, Any], cls: type) -> None:
    event = fresh().receive_text(_bytes({**frame, "id": "early"}))
    rejected(event, ErrorCode.UNAUTHENTICATED, "early")
    assert event.close is None


def test_auth_twice() -> None:
    conn = authed()
    event = conn.receive_text(b'{"op":"auth","id":3,"token":"again"}')
    rejected(event, ErrorCode.ALREADY_AUTHENTICATED, 3)
    assert conn.state is State.OPEN


def test_closed_connection_rejects_everything() -> None:
    conn = authed()
    conn.closed()
    assert isinstance(conn.receive_text(b'{"op":"ping"}'), Rejected)


@pytest.mark.parametrize("make", [fresh, authed])
@pytest.mark.parametrize("data", [b"", b"\x00\x01", b'{"op":"ping"}'])
def test_binary_frame_closes_1003(make: Any, data: bytes) -> None:
    event = make().receive_binary(data)
    assert isinstance(event, Rejected)
    assert event.close is CloseCode.UNSUPPORTED_DATA
    assert event.error.code == ErrorCode.BAD_FRAME.value


def test_rejections_encode_to_error_frames() -> None:
    event = authed().receive_text(b'{"op":"sync","id":"q"}')
    assert isinstance(event, Rejected)
    decoded = json.loads(encode(event.error))
    assert decoded["op"] == "error"
    assert decoded["code"] == "bad_frame"
    assert decoded["id"] == "q"
    assert decoded["retryable"] is False  # always present, also when false


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_frames_always_carry_retryable(code: ErrorCode) -> None:
    decoded = json.loads(encode(error_frame(code, "m")))
    assert decoded["retryable"] is (code in RETRYABLE_CODES)


def test_hello_always_carries_the_protocol_version() -> None:
    hello = f.Hello(user="u", role="customer", session="s1", node="n", heartbeat=30.0, protocol=1)
    assert json.loads(encode(hello))["protocol"] == 1


# -- property: never raises, only documented outcomes --------------------------------------

_ERROR_CODES = {c.value for c in ErrorCode}
_REQUEST_TYPES = (
    f.Auth,
    f.Send,
    f.Sync,
    f.History,
    f.Read,
    f.Typing,
    f.Ping,
    f.Open,
    f.ListConversations,
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
_ops = st.sampled_from([*sorted({fr["op"] for fr, _ in VALID}), "bogus", "", "system"])
_keys = st.sampled_from(
    [
        "op",
        "id",
        "conv",
        "client_msg_id",
        "type",
        "body",
        "token",
        "seq",
        "after_seq",
        "before_seq",
        "limit",
        "customer_id",
        "group",
        "context",
        "context_type",
        "text",
        "x",
    ]
)


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    frame: dict[str, Any] = json.loads(json.dumps(draw(st.sampled_from(VALID))[0]))
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["drop", "add", "retype", "op", "body", "id"]))
        if action == "drop" and frame:
            frame.pop(draw(st.sampled_from(sorted(frame))))
        elif action == "add":
            frame[draw(_keys)] = draw(json_values)
        elif action == "retype" and frame:
            frame[draw(st.sampled_from(sorted(frame)))] = draw(json_values)
        elif action == "op":
            frame["op"] = draw(_ops)
        elif action == "body":
            frame["type"] = draw(
                st.sampled_from(["text", "image", "order_card", "listing_card", "system"])
            )
            frame["body"] = draw(
                st.sampled_from([{"text": "x"}, IMAGE, CARD, {}, draw(json_values)])
            )
        elif action == "id":
            frame["id"] = draw(json_values)
    data = json.dumps(frame).encode()
    if draw(st.booleans()):
        # splice raw bytes somewhere: into a string, between tokens, or cut the frame short
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(max_size=6)) + data[at + draw(st.integers(0, 3)) :]
    return data


@st.composite
def raw_string_frames(draw: st.DrawFn) -> bytes:
    """A valid frame whose string values are replaced by arbitrary bytes (not ``"`` or ``\\``)."""
    data = json.dumps(draw(st.sampled_from(VALID))[0]).encode()
    raw = draw(st.binary(min_size=1, max_size=4).filter(lambda b: b'"' not in b and b"\\" not in b))
    strings = [m.span(1) for m in re.finditer(rb'"([^"]*)"', data)]
    start, end = draw(st.sampled_from(strings))
    return data[:start] + raw + data[end:]


@st.composite
def nested_frames(draw: st.DrawFn) -> bytes:
    """A frame with a deeply nested value where the protocol expects something else."""
    depth = draw(st.sampled_from([1, 2, 30, 300, 5000]))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    nested = opener * depth + (b"1" if opener != b"[" else b"") + closer * depth
    key = draw(st.sampled_from([b"id", b"body", b"context", b"conv", b"x"]))
    op = draw(st.sampled_from([b"send", b"open", b"ping", b"bogus"]))
    return b'{"op":"' + op + b'","' + key + b'":' + nested + b"}"


inputs = st.one_of(
    raw_string_frames(),
    nested_frames(),
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    mutated_frames(),
    mutated_frames().map(lambda b: b.decode("utf-8", "replace")),
)


def _check(event: object) -> None:
    if isinstance(event, Rejected):
        assert event.error.code in _ERROR_CODES, event
        assert event.close is None or isinstance(event.close, CloseCode)
        assert event.error.id is None or isinstance(event.error.id, (str, int))
        encode(event.error)  # the rejection can always be sent
    else:
        assert isinstance(event, _REQUEST_TYPES), event
        if isinstance(event, f.Send):
            msgspec.json.decode(event.body, type=f.BODY_TYPES[event.type])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=inputs)
def test_property_never_raises(data: bytes | str) -> None:
    for conn in (fresh(), authed()):
        _check(conn.receive_text(data))
        if isinstance(data, bytes):
            _check(conn.receive_binary(data))
