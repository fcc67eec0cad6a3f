"""The direct-write fast path's frame header (RFC 6455 section 5.2)."""

from __future__ import annotations

import struct

import pytest

from kefu.transport.aiohttp_ws import text_frame_header


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e" + struct.pack("!H", 126)),
        (65535, b"\x81\x7e" + struct.pack("!H", 65535)),
        (65536, b"\x81\x7f" + struct.pack("!Q", 65536)),
        (10**7, b"\x81\x7f" + struct.pack("!Q", 10**7)),
    ],
)
def test_unmasked_final_text_frame_header(length: int, expected: bytes) -> None:
    header = text_frame_header(length)
    assert header == expected
    assert header[0] & 0x80 and header[0] & 0x0F == 0x1  # FIN, opcode text, no RSV bits
    assert not header[1] & 0x80  # servers never mask
