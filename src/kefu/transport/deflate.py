"""A zlib back end for aiohttp whose deflate streams use a small ``memLevel``.

What a permessage-deflate connection keeps in memory is set mostly by zlib's ``memLevel``
(hash tables: 128 KiB at the default 8), not by the window: measured here, a negotiated
connection cost ~114 KiB of RSS with aiohttp's defaults against ~18 KiB without deflate.
aiohttp offers no per-connection knob for it but lets the zlib implementation be replaced
(``aiohttp.set_zlib_backend``); this one is the standard ``zlib`` module with every
compressor's ``memLevel`` capped. Chat frames are small, so the ratio barely changes.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    from typing_extensions import Buffer


class CompactZlib:
    """The ``zlib`` module, except that compressors get at most ``mem_level``."""

    MAX_WBITS = zlib.MAX_WBITS
    Z_FULL_FLUSH = zlib.Z_FULL_FLUSH
    Z_SYNC_FLUSH = zlib.Z_SYNC_FLUSH
    Z_BEST_SPEED = zlib.Z_BEST_SPEED
    Z_FINISH = zlib.Z_FINISH
    __name__ = "kefu-compact-zlib"

    def __init__(self, mem_level: int) -> None:
        if not 1 <= mem_level <= 9:
            raise ValueError("mem_level must be 1..9")
        self.mem_level = mem_level

    def compressobj(
        self,
        level: int = zlib.Z_DEFAULT_COMPRESSION,
        method: int = zlib.DEFLATED,
        wbits: int = zlib.MAX_WBITS,
        memLevel: int = zlib.DEF_MEM_LEVEL,
        strategy: int = zlib.Z_DEFAULT_STRATEGY,
        zdict: Buffer | None = None,
    ) -> Any:
        mem = min(memLevel, self.mem_level)
        if zdict is None:
            return zlib.compressobj(level, method, wbits, mem, strategy)
        return zlib.compressobj(level, method, wbits, mem, strategy, zdict)

    def decompressobj(self, *args: Any, **kwargs: Any) -> Any:
        return zlib.decompressobj(*args, **kwargs)

    def compress(self, *args: Any, **kwargs: Any) -> bytes:
        return zlib.compress(*args, **kwargs)

    def decompress(self, *args: Any, **kwargs: Any) -> bytes:
        return zlib.decompress(*args, **kwargs)


def install(mem_level: int) -> None:
    """Make aiohttp (process-wide) use compressors with a capped ``memLevel``."""
    aiohttp.set_zlib_backend(CompactZlib(mem_level))
