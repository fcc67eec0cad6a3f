"""The server side of wire protocol v1, sans I/O.

Feed it the payload of each WebSocket message with :meth:`ServerConnection.receive_text`
(or :meth:`receive_binary`); it returns either a validated client request (a frame Struct
from :mod:`kefu.protocol.frames`) or a :class:`Rejected` event carrying the documented
``error`` frame to send and, when the connection must end, the close code. Outgoing frames
are turned into bytes with :func:`encode`. Nothing here touches a socket, a clock or asyncio.
"""

from __future__ import annotations

import dataclasses
import enum
import typing

import msgspec

from kefu.errors import RETRYABLE_CODES, CloseCode, ErrorCode
from kefu.protocol import frames as f

_request_decoder = msgspec.json.Decoder(f.ClientRequest)
_encoder = msgspec.json.Encoder()


class _Envelope(msgspec.Struct):
    """What we can still read out of a frame that failed validation."""

    op: object = None
    id: object = None


_envelope_decoder = msgspec.json.Decoder(_Envelope)
_body_decoders = {name: msgspec.json.Decoder(cls) for name, cls in f.BODY_TYPES.items()}
_KNOWN_OPS = frozenset(
    cls.__struct_config__.tag
    for cls in typing.get_args(f.ClientRequest)
    if isinstance(cls.__struct_config__.tag, str)
)
_PRE_AUTH_OPS = (f.Auth, f.Ping)


class State(enum.Enum):
    AWAITING_AUTH = "awaiting_auth"
    OPEN = "open"
    CLOSED = "closed"


@dataclasses.dataclass(frozen=True, slots=True)
class Rejected:
    """A client frame was refused: send ``error``; then close with ``close`` if set."""

    error: f.Error
    close: CloseCode | None = None


Event = f.ClientRequest | Rejected


def encode(frame: f.ServerFrame) -> bytes:
    """Serialise a server frame to the UTF-8 JSON payload of a text message."""
    return _encoder.encode(frame)


def error_frame(
    code: ErrorCode,
    message: str,
    *,
    request_id: f.RequestId | None = None,
    retryable: bool | None = None,
    retry_after: float | None = None,
) -> f.Error:
    """An error frame; ``retryable`` defaults to what the code implies."""
    return f.Error(
        code=code.value,
        message=message,
        retryable=code in RETRYABLE_CODES if retryable is None else retryable,
        id=request_id,
        retry_after=retry_after,
    )


def _safe_request_id(value: object) -> f.RequestId | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and len(value) <= 64:
        return value
    return None


# RFC 6455 section 8.1: a text message that is not UTF-8 fails the connection.
_NOT_UTF8 = Rejected(
    error_frame(ErrorCode.BAD_JSON, "text frame is not valid UTF-8"),
    close=CloseCode.INVALID_PAYLOAD,
)


def _not_utf8(data: bytes | str | msgspec.Raw) -> Rejected | None:
    """On the error path only: is the real problem invalid UTF-8 in the frame?"""
    if isinstance(data, str):
        return None
    try:
        bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        return _NOT_UTF8
    return None


class ServerConnection:
    """Protocol state of one client connection."""

    def __init__(self, *, max_body_chars: int = 8000) -> None:
        self.state = State.AWAITING_AUTH
        self.max_body_chars = max_body_chars

    # -- input ----------------------------------------------------------------------------

    def receive_text(self, data: bytes | str) -> Event:
        """Decode and validate one text message from the client."""
        if self.state is State.CLOSED:
            return Rejected(error_frame(ErrorCode.BAD_FRAME, "connection is closed"))
        try:
            request: f.ClientRequest = _request_decoder.decode(data)
        except msgspec.ValidationError as exc:
            return _not_utf8(data) or self._invalid(data, str(exc))
        except msgspec.DecodeError as exc:
            return _not_utf8(data) or Rejected(
                error_frame(ErrorCode.BAD_JSON, f"frame is not valid JSON: {exc}")
            )
        except UnicodeDecodeError:
            return _NOT_UTF8
        except RecursionError:
            return Rejected(error_frame(ErrorCode.BAD_FRAME, "JSON nested too deeply"))
        if self.state is State.AWAITING_AUTH and not isinstance(request, _PRE_AUTH_OPS):
            return Rejected(
                error_frame(
                    ErrorCode.UNAUTHENTICATED,
                    "authenticate first (auth frame, token query parameter or header)",
                    request_id=request.id,
                )
            )
        if isinstance(request, f.Auth) and self.state is State.OPEN:
            return Rejected(
                error_frame(
                    ErrorCode.ALREADY_AUTHENTICATED,
                    "this connection is already authenticated",
                    request_id=request.id,
                )
            )
        if isinstance(request, f.Send):
            return self._check_send(request)
        return request

    def receive_binary(self, data: bytes) -> Rejected:
        """Binary messages are not part of protocol v1: the connection is closed."""
        return Rejected(
            error_frame(ErrorCode.BAD_FRAME, "binary frames are not supported; send JSON text"),
            close=CloseCode.UNSUPPORTED_DATA,
        )

    # -- state changes driven by the node -------------------------------------------------

    def authenticated(self) -> None:
        self.state = State.OPEN

    def closed(self) -> None:
        self.state = State.CLOSED

    # -- helpers --------------------------------------------------------------------------

    def _invalid(self, data: bytes | str, reason: str) -> Rejected:
        try:
            envelope = _envelope_decoder.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return Rejected(
                error_frame(ErrorCode.BAD_FRAME, f"frame must be a JSON object: {reason}")
            )
        request_id = _safe_request_id(envelope.id)
        if not isinstance(envelope.op, str):
            return Rejected(
                error_frame(
                    ErrorCode.BAD_FRAME, "frame needs a string 'op' field", request_id=request_id
                )
            )
        if envelope.op not in _KNOWN_OPS:
            return Rejected(
                error_frame(
                    ErrorCode.UNKNOWN_OP,
                    f"unknown op {envelope.op[:40]!r}",
                    request_id=request_id,
                )
            )
        return Rejected(
            error_frame(
                ErrorCode.BAD_FRAME,
                f"invalid {envelope.op!r} frame: {reason}",
                request_id=request_id,
            )
        )

    def _check_send(self, request: f.Send) -> Event:
        try:
            body = _body_decoders[request.type].decode(request.body)
        except (
            msgspec.ValidationError,
            msgspec.DecodeError,
            UnicodeDecodeError,
            RecursionError,
        ) as exc:
            return _not_utf8(request.body) or Rejected(
                error_frame(
                    ErrorCode.BAD_FRAME,
                    f"invalid body for type {request.type!r}: {exc}",
                    request_id=request.id,
                )
            )
        if isinstance(body, f.TextBody) and len(body.text) > self.max_body_chars:
            return Rejected(
                error_frame(
                    ErrorCode.BAD_FRAME,
                    f"text longer than {self.max_body_chars} characters",
                    request_id=request.id,
                )
            )
        # Store the canonical encoding: no whitespace, fields in a fixed order.
        request.body = msgspec.Raw(_encoder.encode(body))
        return request
