"""JSON Web Tokens: HS256 only, claims ``sub``, ``role`` and ``exp`` all required."""

from __future__ import annotations

import time

import jwt

from kefu.errors import AuthError, ErrorCode
from kefu.model import Principal, Role

ALGORITHM = "HS256"
_CLIENT_ROLES = frozenset({Role.CUSTOMER, Role.AGENT, Role.ADMIN})


def issue_token(secret: str, user_id: str, role: Role | str, *, ttl: float = 3600.0) -> str:
    """Sign a token for ``user_id`` in ``role`` that expires ``ttl`` seconds from now."""
    role = Role(role)
    if role not in _CLIENT_ROLES:
        raise ValueError(f"cannot issue a token for role {role!r}")
    if not user_id:
        raise ValueError("user_id must not be empty")
    now = int(time.time())
    claims = {"sub": user_id, "role": role.value, "iat": now, "exp": now + int(ttl)}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(secret: str, token: str, *, leeway: float = 5.0) -> Principal:
    """Return who the token names, or raise :class:`AuthError` with a precise code.

    Only HS256 is accepted, so ``alg: none`` and algorithm-confusion tokens fail.
    """
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["sub", "role", "exp"]},
            leeway=leeway,
        )
    except jwt.ExpiredSignatureError as exc:
        raise AuthError("token has expired", code=ErrorCode.TOKEN_EXPIRED) from exc
    except jwt.PyJWTError as exc:
        raise AuthError(f"invalid token: {exc}") from exc
    sub, role = claims.get("sub"), claims.get("role")
    if not isinstance(sub, str) or not sub or len(sub) > 128:
        raise AuthError("invalid token: 'sub' must be a non-empty string of at most 128 chars")
    if role not in ("customer", "agent", "admin"):
        raise AuthError("invalid token: 'role' must be customer, agent or admin")
    return Principal(user_id=sub, role=Role(role))
