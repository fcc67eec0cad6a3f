"""Identifiers: time-ordered, 128-bit, lowercase hex (the layout of a UUIDv7)."""

from __future__ import annotations

import random
import time


def new_id() -> str:
    """A unique id whose first 48 bits are the Unix time in milliseconds.

    Ids made later sort later (to the millisecond), which keeps database indexes compact.
    """
    ms = time.time_ns() // 1_000_000
    rand = random.getrandbits(76)  # unique, not secret: access is checked, never guessed
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | (0x7 << 76) | (rand & ((1 << 76) - 1))
    return f"{value:032x}"


def now_ms() -> int:
    return time.time_ns() // 1_000_000
