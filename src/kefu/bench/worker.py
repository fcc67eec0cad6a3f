"""A load-generator process: its own uvloop loop and :class:`Fleet`, driven over a pipe.

The parent starts one per ~5,000 sockets (the open-file limit is per process). The worker
answers each command with one result and exits after :class:`Close`, or when the parent
goes away (its pipe closes), or after a long idle timeout, whichever comes first.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import traceback
from multiprocessing.connection import Connection

from kefu.bench import commands as c
from kefu.bench.fleet import Fleet

log = logging.getLogger(__name__)

#: A worker that hears nothing from its parent for this long gives up.
IDLE_TIMEOUT = 900.0


def raise_nofile_limit() -> int:
    """Raise this process's soft open-file limit to the hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def main(pipe: Connection, spec: c.WorkerSpec) -> None:
    """Process entry point (multiprocessing target)."""
    raise_nofile_limit()
    try:
        import uvloop

        uvloop.run(_serve(pipe, spec))
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_serve(pipe, spec))


async def _serve(pipe: Connection, spec: c.WorkerSpec) -> None:
    fleet = Fleet(spec)
    loop = asyncio.get_running_loop()
    try:
        while True:
            ready = await loop.run_in_executor(None, pipe.poll, IDLE_TIMEOUT)
            if not ready:
                log.warning("worker %d: no command for %.0fs, exiting", spec.worker, IDLE_TIMEOUT)
                return
            try:
                command: c.Command = pipe.recv()
            except EOFError:
                return
            result = await _handle(fleet, command)
            pipe.send(result)
            if isinstance(command, c.Close):
                return
    finally:
        if not fleet.stopping:
            await fleet.close(c.Close(timeout=5.0))


async def _handle(fleet: Fleet, command: c.Command) -> c.Result:
    try:
        if isinstance(command, c.Connect):
            return await fleet.connect(command)
        if isinstance(command, c.Open):
            return await fleet.open(command)
        if isinstance(command, c.Run):
            return await fleet.run(command)
        return await fleet.close(command)
    except Exception:
        return c.Failed(traceback.format_exc(limit=5))
