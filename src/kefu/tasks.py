"""Small helpers for the node's long-running asyncio tasks."""

from __future__ import annotations

import asyncio


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
