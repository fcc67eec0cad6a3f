"""A bare aiohttp WebSocket echo server: the ceiling Kefu's node is compared against.

``python -m kefu.bench.echo --port P`` serves ``/echo`` (every text frame is sent straight
back, unparsed) and ``/health``, on uvloop, with the same socket options the node uses. It
stops on SIGTERM/SIGINT, or by itself after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from aiohttp import WSMsgType, web

from kefu.bench.worker import raise_nofile_limit


async def echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(
        compress=request.app[COMPRESS_KEY], autoping=True, max_msg_size=1 << 20
    )
    await ws.prepare(request)
    while True:
        msg = await ws.receive()
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
        else:
            break
    return ws


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


COMPRESS_KEY = web.AppKey("compress", bool)


async def serve(host: str, port: int, compress: bool, max_seconds: float) -> None:
    app = web.Application()
    app[COMPRESS_KEY] = compress
    app.router.add_get("/echo", echo)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), max_seconds)
    except TimeoutError:
        pass
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kefu.bench.echo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--compress", action="store_true", help="accept permessage-deflate")
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    args = parser.parse_args(argv)
    raise_nofile_limit()
    import uvloop

    uvloop.run(serve(args.host, args.port, args.compress, args.max_seconds))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
