"""How late the node's event loop runs: ``kefu_event_loop_lag_seconds``.

Every latency a client sees includes the time a ready callback waits for the loop: behind
other callbacks, a blocking call, a garbage collection, or a CPU the process does not get.
A timer due every ``period`` seconds records how late it fired. The figure is sampled, so
a stall shorter than the period is seen in proportion to its length; the sum of the
histogram over time tells the share of time the loop ran late.
"""

from __future__ import annotations

import asyncio

from kefu.instruments import Histogram

#: Seconds between samples.
PERIOD = 0.1


async def watch_loop(lag: Histogram, period: float = PERIOD) -> None:
    """Observe the lateness of a ``period`` timer into ``lag``, until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + period
        await asyncio.sleep(period)
        lag.observe(max(0.0, loop.time() - due))
