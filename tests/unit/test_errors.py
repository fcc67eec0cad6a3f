"""Close-code reconnect policy and the error tree's codes."""

from __future__ import annotations

import pytest

from kefu.errors import (
    RETRYABLE_CODES,
    AuthError,
    CloseCode,
    ConfigError,
    ErrorCode,
    Forbidden,
    KefuError,
    LimitExceeded,
    NotFound,
    ProtocolError,
    StoreClosed,
    StoreError,
    should_reconnect,
)


@pytest.mark.parametrize("code", [4000, 4001, 4002, 4003, 4004, 4250, 4499])
def test_kefu_reconnect_range(code: int) -> None:
    assert should_reconnect(code) is True


@pytest.mark.parametrize("code", [4500, 4501, 4502, 4503, 4504, 4750, 4999])
def test_kefu_no_reconnect_range(code: int) -> None:
    assert should_reconnect(code) is False


@pytest.mark.parametrize("code", [1000, 1002, 1003, 1007, 1008, 1009, 1010])
def test_rfc_final_codes(code: int) -> None:
    assert should_reconnect(code) is False


@pytest.mark.parametrize("code", [1001, 1005, 1006, 1011, 1012, 1013, 1014, 1015])
def test_rfc_reconnect_codes(code: int) -> None:
    assert should_reconnect(code) is True


@pytest.mark.parametrize("code", [3000, 3999, 5000, 0])
def test_unknown_codes_reconnect(code: int) -> None:
    assert should_reconnect(code) is True


def test_close_code_property_matches_function_and_ranges() -> None:
    for member in CloseCode:
        assert member.reconnect is should_reconnect(int(member))
        if 4000 <= member < 4500:
            assert member.reconnect
        if 4500 <= member < 5000:
            assert not member.reconnect
    assert CloseCode.SLOW_CONSUMER.reconnect
    assert CloseCode.HEARTBEAT_TIMEOUT.reconnect
    assert not CloseCode.TOKEN_EXPIRED.reconnect
    assert not CloseCode.TOO_MANY_CONNECTIONS.reconnect
    assert CloseCode.SERVICE_RESTART.reconnect
    assert not CloseCode.MESSAGE_TOO_BIG.reconnect


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (KefuError(), ErrorCode.INTERNAL),
        (ConfigError("x"), ErrorCode.INTERNAL),
        (ProtocolError(), ErrorCode.BAD_FRAME),
        (AuthError(), ErrorCode.INVALID_TOKEN),
        (Forbidden(), ErrorCode.FORBIDDEN),
        (NotFound(), ErrorCode.NOT_FOUND),
        (LimitExceeded(), ErrorCode.RATE_LIMITED),
        (StoreError(), ErrorCode.STORE_UNAVAILABLE),
        (StoreClosed(), ErrorCode.SHUTTING_DOWN),
        (AuthError("late", code=ErrorCode.TOKEN_EXPIRED), ErrorCode.TOKEN_EXPIRED),
    ],
)
def test_error_codes(exc: KefuError, code: ErrorCode) -> None:
    assert exc.code is code
    assert exc.retryable is (code in RETRYABLE_CODES)
    assert exc.message


def test_retryable_codes() -> None:
    assert {c.value for c in RETRYABLE_CODES} == {
        "rate_limited",
        "node_full",
        "store_unavailable",
        "overloaded",
        "shutting_down",
        "internal",
    }
    assert isinstance(StoreClosed(), StoreError)


@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        (ErrorCode.TOO_MANY_CONNECTIONS, False),
        (ErrorCode.NODE_FULL, True),
        (ErrorCode.IDEMPOTENCY_CONFLICT, False),
    ],
)
def test_connection_and_idempotency_codes(code: ErrorCode, retryable: bool) -> None:
    assert (code in RETRYABLE_CODES) is retryable
    assert KefuError("x", code=code).retryable is retryable


def test_codes_sent_before_a_close() -> None:
    assert ErrorCode.TOO_MANY_CONNECTIONS.value == "too_many_connections"
    assert ErrorCode.NODE_FULL.value == "node_full"
    assert CloseCode.TOO_MANY_CONNECTIONS == 4504
    assert CloseCode.NODE_FULL == 4004
    assert CloseCode.NODE_FULL.reconnect
    assert CloseCode.INVALID_PAYLOAD == 1007
    assert not CloseCode.INVALID_PAYLOAD.reconnect
    assert CloseCode.INTERNAL_ERROR.reconnect
