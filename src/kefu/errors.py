"""Kefu's one exception tree, its error codes and its WebSocket close codes.

Exception tree::

    KefuError
    ├── ConfigError              bad configuration at start-up (never seen by clients)
    ├── ProtocolError            a client frame that breaks the wire protocol
    ├── AuthError                a token that is missing, forged, expired or for someone else
    ├── Forbidden                an authenticated user reaching what is not theirs
    ├── NotFound                 an unknown conversation, agent or group (``not_found``)
    ├── InvalidTransition        a lifecycle event the conversation's state does not allow
    ├── InvalidArgument          a well-formed request with an unacceptable value
    ├── LimitExceeded            a bound was hit (rate, connections, queue)
    ├── StoreError               the system of record failed; the operation is retryable
    │   ├── StoreClosed          the store is shutting down
    │   └── Overloaded           too many writes queued; retry after a short pause
    ├── ClusterError             Redis (shared state, cross-node delivery) is unreachable
    ├── EmptyRing                (kefu.cluster.ring) a ring lookup with no live node
    ├── RoutingError             (kefu.routing) a queue or assignment operation refused
    └── ClientError              raised by kefu.client
        ├── RemoteError          the server answered a request with an error frame
        └── ConnectionClosed     the connection ended and will not be re-established

Every exception that can reach a client carries an :class:`ErrorCode`. The code, not the
message text, is the contract: it is what docs/protocol.md lists and clients switch on.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Machine-readable codes carried by ``error`` frames (see docs/protocol.md)."""

    BAD_JSON = "bad_json"
    BAD_FRAME = "bad_frame"
    UNKNOWN_OP = "unknown_op"
    UNAUTHENTICATED = "unauthenticated"
    ALREADY_AUTHENTICATED = "already_authenticated"
    INVALID_TOKEN = "invalid_token"
    TOKEN_EXPIRED = "token_expired"
    USER_MISMATCH = "user_mismatch"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONVERSATION_CLOSED = "conversation_closed"
    INVALID_TRANSITION = "invalid_transition"
    INVALID_ARGUMENT = "invalid_argument"
    AGENT_UNAVAILABLE = "agent_unavailable"
    NOT_MEMBER = "not_member"
    ALREADY_RATED = "already_rated"
    CONFLICT = "conflict"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    NODE_FULL = "node_full"
    STORE_UNAVAILABLE = "store_unavailable"
    OVERLOADED = "overloaded"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"


#: Codes after which repeating the same request later may succeed.
RETRYABLE_CODES = frozenset(
    {
        ErrorCode.RATE_LIMITED,
        ErrorCode.NODE_FULL,
        ErrorCode.STORE_UNAVAILABLE,
        ErrorCode.OVERLOADED,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.INTERNAL,
    }
)


class CloseCode(enum.IntEnum):
    """WebSocket close codes.

    Ranges (mirrored in docs/protocol.md):

    * 1000-1015: RFC 6455 codes; 1001, 1011, 1012 and 1013 mean "reconnect".
    * 4000-4499: Kefu codes after which the client reconnects (with backoff).
    * 4500-4999: Kefu codes after which the client must NOT reconnect as it is
      (it needs a new token, a fix, or a user action first).
    """

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013

    HEARTBEAT_TIMEOUT = 4000
    SLOW_CONSUMER = 4001
    AUTH_TIMEOUT = 4002
    RATE_FLOOD = 4003
    NODE_FULL = 4004

    INVALID_TOKEN = 4500
    TOKEN_EXPIRED = 4501
    USER_MISMATCH = 4502
    ORIGIN_FORBIDDEN = 4503
    TOO_MANY_CONNECTIONS = 4504

    @property
    def reconnect(self) -> bool:
        """Whether a client should reconnect after this close code."""
        return should_reconnect(int(self))


def should_reconnect(code: int) -> bool:
    """Reconnect policy for any close code, including ones this version does not know."""
    if 4000 <= code < 4500:
        return True
    if 4500 <= code < 5000:
        return False
    return code not in (1000, 1002, 1003, 1007, 1008, 1009, 1010)


class KefuError(Exception):
    """Root of every exception Kefu raises on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(
        self,
        message: str = "",
        *,
        code: ErrorCode | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message or self.__class__.__name__)
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    @property
    def message(self) -> str:
        return str(self.args[0])

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE_CODES


class ConfigError(KefuError):
    """The configuration is invalid; raised at start-up only."""


class ProtocolError(KefuError):
    """A frame from the peer violates the wire protocol."""

    code = ErrorCode.BAD_FRAME


class AuthError(KefuError):
    """Authentication failed."""

    code = ErrorCode.INVALID_TOKEN


class Forbidden(KefuError):
    code = ErrorCode.FORBIDDEN


class NotFound(KefuError):
    code = ErrorCode.NOT_FOUND


class InvalidTransition(KefuError):
    """The conversation's state does not allow this lifecycle event (state is unchanged)."""

    code = ErrorCode.INVALID_TRANSITION


class InvalidArgument(KefuError):
    """A request that is well formed but asks for something unacceptable."""

    code = ErrorCode.INVALID_ARGUMENT


class LimitExceeded(KefuError):
    code = ErrorCode.RATE_LIMITED


class StoreError(KefuError):
    """The system of record could not complete an operation; retry later."""

    code = ErrorCode.STORE_UNAVAILABLE


class StaleConversation(StoreError):
    """An append was authorised against a conversation state that changed meanwhile (on
    another node): nothing was stored; decide again on the fresh state."""


class StoreClosed(StoreError):
    code = ErrorCode.SHUTTING_DOWN


class Overloaded(StoreError):
    code = ErrorCode.OVERLOADED


class ClusterError(KefuError):
    """The cluster's shared state (Redis) could not be reached; retry later."""

    code = ErrorCode.STORE_UNAVAILABLE


class ClientError(KefuError):
    """Raised by :mod:`kefu.client`."""


class RemoteError(ClientError):
    """The server answered with an ``error`` frame; ``code`` is its error code."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retry_after: float | None = None,
        retryable: bool | None = None,
    ) -> None:
        try:
            known: ErrorCode | None = ErrorCode(code)
        except ValueError:
            known = None
        super().__init__(message, code=known or ErrorCode.INTERNAL, retry_after=retry_after)
        self.raw_code = code
        # What the frame says wins: a code this version does not know is retried only when
        # the server marked it retryable.
        self._retryable = (known in RETRYABLE_CODES) if retryable is None else retryable

    @property
    def retryable(self) -> bool:
        return self._retryable


class ConnectionClosed(ClientError):
    """The connection closed with a code after which the client does not reconnect."""

    def __init__(self, close_code: int | None, message: str = "") -> None:
        super().__init__(message or f"connection closed ({close_code})")
        self.close_code = close_code
