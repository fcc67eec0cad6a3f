"""kefu.loopwatch: a stall of the event loop shows in ``kefu_event_loop_lag_seconds``."""

from __future__ import annotations

import asyncio
import contextlib
import time

from prometheus_client import CollectorRegistry

from kefu.instruments import Histogram
from kefu.loopwatch import watch_loop


def sample(registry: CollectorRegistry, suffix: str, labels: dict[str, str] | None = None) -> float:
    value = registry.get_sample_value(f"lag{suffix}", labels or {})
    assert value is not None
    return value


async def test_a_blocked_loop_is_measured_and_the_watch_stops_when_cancelled() -> None:
    registry = CollectorRegistry()
    lag = Histogram("lag", "doc", buckets=(0.01, 0.1, 1.0), registry=registry)
    watch = asyncio.get_running_loop().create_task(watch_loop(lag, period=0.02))
    await asyncio.sleep(0.1)  # a few samples of an idle loop
    before = sample(registry, "_count")
    assert before >= 1
    time.sleep(0.25)  # a blocking call holds the loop: the pending timer fires >= 0.2 s late
    await asyncio.sleep(0.1)
    assert sample(registry, "_count") > before
    assert sample(registry, "_sum") >= 0.2
    late = sample(registry, "_count") - sample(registry, "_bucket", {"le": "0.1"})
    assert late >= 1  # the sample that waited out the stall (a busy machine may add more)
    watch.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watch
    assert watch.cancelled()
