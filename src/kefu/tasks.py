"""Small helpers for the node's long-running asyncio tasks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)


def stop_if_cancelled() -> None:
    """Re-raise a cancellation that a library turned into another error.

    A cancel that lands while a driver's own ``asyncio.timeout`` block expires comes out
    as TimeoutError (and the driver or our code may wrap that again): a loop that logs
    errors and goes on would never stop. The task still counts the request, so ask it.
    Call this first in every ``except`` of a loop that must keep running on errors.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def stop(tasks: Iterable[asyncio.Task[Any]], *, timeout: float = 5.0) -> None:
    """Cancel ``tasks`` and wait for them, at most ``timeout`` seconds (a task that ignores
    its cancellation is logged and left behind, never waited for forever). Their loops
    should also check a closing flag, which stops them even then."""
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    if not pending:
        return
    _, stuck = await asyncio.wait(pending, timeout=timeout)
    for task in stuck:  # pragma: no cover - a task that ignored its cancellation
        log.error("task %s did not stop", task.get_name())
    for task in pending:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: its failure was logged where it happened
