"""JWT issue and verify: HS256 only, sub/role/exp required, precise error codes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest

from kefu.auth import issue_token, verify_token
from kefu.errors import AuthError, ErrorCode
from kefu.model import Principal, Role

SECRET = "unit-secret-0123456789-0123456789-abcdef"
OTHER = "another-secret-0123456789-0123456789-xyz"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(claims).encode())
    return f"{head}.{body}.{b64(signature)}"


def hs256(header: dict[str, Any], claims: dict[str, Any], secret: str) -> str:
    unsigned = hand_made(header, claims).rsplit(".", 1)[0]
    sig = hmac.new(secret.encode(), unsigned.encode(), hashlib.sha256).digest()
    return f"{unsigned}.{b64(sig)}"


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "alice", "role": "customer", "iat": now, "exp": now + 600}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def code_of(tok: str, secret: str = SECRET) -> ErrorCode:
    with pytest.raises(AuthError) as info:
        verify_token(secret, tok)
    return info.value.code


@pytest.mark.parametrize("role", ["customer", "agent", "admin", Role.AGENT])
def test_round_trip(role: str) -> None:
    tok = issue_token(SECRET, "user-1", role)
    assert verify_token(SECRET, tok) == Principal(user_id="user-1", role=Role(role))


def test_ttl_sets_exp() -> None:
    tok = issue_token(SECRET, "u", "agent", ttl=120)
    decoded = jwt.decode(tok, SECRET, algorithms=["HS256"])
    assert decoded["exp"] - decoded["iat"] == 120
    assert jwt.get_unverified_header(tok)["alg"] == "HS256"


@pytest.mark.parametrize(
    ("user", "role"), [("", "customer"), ("u", "system"), ("u", "root"), ("u", "")]
)
def test_issue_refuses_bad_input(user: str, role: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies
        issue_token(SECRET, user, role)


def test_expired_token() -> None:
    tok = issue_token(SECRET, "u", "customer", ttl=-60)
    assert code_of(tok) is ErrorCode.TOKEN_EXPIRED


def test_expiry_within_leeway_is_accepted() -> None:
    tok = hs256({"alg": "HS256", "typ": "JWT"}, claims(exp=int(time.time()) - 2), SECRET)
    assert verify_token(SECRET, tok).user_id == "alice"


def test_expired_and_forged_is_invalid_not_expired() -> None:
    tok = hs256({"alg": "HS256", "typ": "JWT"}, claims(exp=int(time.time()) - 600), OTHER)
    assert code_of(tok) is ErrorCode.INVALID_TOKEN


def test_wrong_secret() -> None:
    assert code_of(issue_token(OTHER, "u", "customer")) is ErrorCode.INVALID_TOKEN


def test_forged_signature() -> None:
    tok = issue_token(SECRET, "alice", "customer")
    head, body, sig = tok.split(".")
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    assert code_of(f"{head}.{body}.{flipped}") is ErrorCode.INVALID_TOKEN
    # a body swapped in under the original signature
    evil = b64(json.dumps(claims(sub="mallory", role="admin")).encode())
    assert code_of(f"{head}.{evil}.{sig}") is ErrorCode.INVALID_TOKEN


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none(alg: str) -> None:
    tok = hand_made({"alg": alg, "typ": "JWT"}, claims(role="admin"))
    assert tok.endswith(".")
    assert code_of(tok) is ErrorCode.INVALID_TOKEN


def test_alg_none_with_a_signature_part() -> None:
    tok = hand_made({"alg": "none", "typ": "JWT"}, claims(), b"sig")
    assert code_of(tok) is ErrorCode.INVALID_TOKEN


def test_hs512_with_the_right_secret_is_refused() -> None:
    long_secret = SECRET * 2  # long enough for HS512, so PyJWT does not warn
    tok = jwt.encode(claims(), long_secret, algorithm="HS512")
    assert code_of(tok, long_secret) is ErrorCode.INVALID_TOKEN


@pytest.mark.parametrize("alg", ["RS256", "ES256", "PS256", "HS384", "EdDSA"])
def test_algorithm_confusion_hmac_signed_under_another_alg(alg: str) -> None:
    """Signed with HMAC-SHA256 and the real secret but labelled another algorithm."""
    tok = hs256({"alg": alg, "typ": "JWT"}, claims(role="admin"), SECRET)
    assert code_of(tok) is ErrorCode.INVALID_TOKEN


def test_header_without_alg() -> None:
    tok = hs256({"typ": "JWT"}, claims(), SECRET)
    assert code_of(tok) is ErrorCode.INVALID_TOKEN


@pytest.mark.parametrize("missing", ["sub", "role", "exp"])
def test_missing_required_claim(missing: str) -> None:
    tok = jwt.encode(claims(**{missing: None}), SECRET, algorithm="HS256")
    assert code_of(tok) is ErrorCode.INVALID_TOKEN


@pytest.mark.parametrize("role", ["system", "root", "", "Customer", 1, None, ["admin"]])
def test_bad_role(role: Any) -> None:
    c = claims()
    c["role"] = role
    assert code_of(jwt.encode(c, SECRET, algorithm="HS256")) is ErrorCode.INVALID_TOKEN


@pytest.mark.parametrize("sub", ["", 42, "x" * 129, ["alice"]])
def test_bad_subject(sub: Any) -> None:
    c = claims()
    c["sub"] = sub
    assert code_of(jwt.encode(c, SECRET, algorithm="HS256")) is ErrorCode.INVALID_TOKEN


@pytest.mark.parametrize("exp", ["tomorrow", None, [1]])
def test_bad_exp(exp: Any) -> None:
    c = claims()
    c["exp"] = exp
    assert code_of(hs256({"alg": "HS256", "typ": "JWT"}, c, SECRET)) is ErrorCode.INVALID_TOKEN


@pytest.mark.parametrize(
    "tok", ["", "garbage", "a.b", "a.b.c", "...", "eyJhbGciOiJIUzI1NiJ9.e30.", "x" * 5000]
)
def test_malformed_tokens(tok: str) -> None:
    assert code_of(tok) is ErrorCode.INVALID_TOKEN


def test_sub_of_max_length_is_accepted() -> None:
    tok = issue_token(SECRET, "x" * 128, "customer")
    assert verify_token(SECRET, tok).user_id == "x" * 128


def test_auth_error_is_not_retryable() -> None:
    with pytest.raises(AuthError) as info:
        verify_token(SECRET, "garbage")
    assert not info.value.retryable
