"""The client side of wire protocol v1, sans I/O: encode requests, decode server frames."""

from __future__ import annotations

import msgspec

from kefu.protocol import frames as f

_server_decoder = msgspec.json.Decoder(f.ServerEvent)
_encoder = msgspec.json.Encoder()


def encode_request(request: f.ClientRequest) -> bytes:
    """Serialise a client request to the payload of a text message."""
    return _encoder.encode(request)


def decode_event(data: bytes | str) -> f.ServerEvent:
    """Decode one server frame; raises ``msgspec.DecodeError`` on a malformed frame."""
    event: f.ServerEvent = _server_decoder.decode(data)
    return event


def decode_body(message: f.Message) -> msgspec.Struct:
    """Decode a message's body into the Struct its ``type`` names."""
    cls = f.BODY_TYPES.get(message.type, f.SystemBody)
    return msgspec.json.decode(message.body, type=cls)
