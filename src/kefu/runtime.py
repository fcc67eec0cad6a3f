"""Process-wide tuning for a node process (called once by ``kefu serve``, not by tests).

* **Garbage collector.** A node holds tens of thousands of long-lived connection objects
  (60-75 GC-tracked objects each). With CPython's default thresholds a full collection
  walks all of them every few seconds under load and stalls the event loop for hundreds of
  milliseconds at 10k connections (docs/benchmarks.md). Objects made during start-up are
  frozen out of collection, young collections run every ``GC_GEN0`` allocations instead
  of 700 (most per-message objects die by reference counting long before), and older
  generations are examined far less often. CPython still skips a full collection unless
  the long-lived objects grew by 25%, so memory stays bounded.
* **GIL switch interval.** The SQLite writer thread takes the GIL back after each
  statement; with the default 5 ms interval it can wait that long behind a busy event loop
  for every statement. 1 ms keeps group commits short.
* **Open files.** The soft limit is raised to the hard limit: every connection is a file.
"""

from __future__ import annotations

import gc
import logging
import resource
import sys
import time

from kefu.metrics import Metrics

log = logging.getLogger(__name__)

GC_GEN0 = 20_000
GC_GEN1 = 20
GC_GEN2 = 20
SWITCH_INTERVAL = 0.0002


def tune_process(metrics: Metrics | None = None) -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0, GC_GEN1, GC_GEN2)
    sys.setswitchinterval(SWITCH_INTERVAL)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # pragma: no cover - platform specific
            log.warning("cannot raise the open-file limit to %d: %s", hard, exc)
    log.debug("open-file limit %d", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    if metrics is not None:
        gc.callbacks.append(_GcTimer(metrics))


class _GcTimer:
    """Observe every collection's pause in ``kefu_gc_pause_seconds``."""

    def __init__(self, metrics: Metrics) -> None:
        self.children = [metrics.gc_pauses.labels(str(g)) for g in range(3)]
        self.started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        else:
            self.children[info["generation"]].observe(time.perf_counter() - self.started)
