"""The measurements, each a bounded sequence of swarm commands.

* :func:`capacity` - connect every socket (hello + one ping round trip each, so a
  negotiated permessage-deflate stream has built both its compressor and decompressor) and
  read the server's RSS before and after: memory per connection.
* :func:`sustained` - a fixed rate for a few windows; the median window is reported.
* :func:`saturate` - geometric rate steps until a step no longer holds.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence

from kefu.bench.procfs import Pids, rss_kb, wait_quiet
from kefu.bench.stats import Latency, median, merge_counts
from kefu.bench.swarm import Step, Swarm

log = logging.getLogger(__name__)

#: A saturation step holds when this share of the offered rate was acknowledged in time...
HOLD_SHARE = 0.95
#: ...and the end-to-end p99 stayed under this many milliseconds.
HOLD_P99_MS = 100.0


@dataclasses.dataclass(slots=True)
class Capacity:
    label: str
    connections: int
    connected: int
    failed: int
    connect_seconds: float
    rss_before_kb: int | None
    rss_after_kb: int | None
    rtt: Latency
    errors: dict[str, int]

    @property
    def per_connection_kb(self) -> float:
        if self.rss_before_kb is None or self.rss_after_kb is None or not self.connected:
            return math.nan
        return (self.rss_after_kb - self.rss_before_kb) / self.connected


def capacity(
    swarm: Swarm, label: str, server_pid: int | None, timeout: float, settle: float = 2.0
) -> Capacity:
    before = rss_kb(server_pid) if server_pid else None
    parts = swarm.connect(timeout)
    time.sleep(settle)  # let the server finish what the last handshakes started
    after = rss_kb(server_pid) if server_pid else None
    return Capacity(
        label=label,
        connections=swarm.plan.pairs * 2,
        connected=sum(p.connected for p in parts),
        failed=sum(p.failed for p in parts),
        connect_seconds=max(p.seconds for p in parts),
        rss_before_kb=before,
        rss_after_kb=after,
        rtt=Latency.of(x for p in parts for x in p.rtt),
        errors=merge_counts(p.errors for p in parts),
    )


@dataclasses.dataclass(slots=True)
class Opened:
    opened: int
    failed: int
    seconds: float
    errors: dict[str, int]


def open_conversations(swarm: Swarm, timeout: float) -> Opened:
    parts = swarm.open(timeout)
    return Opened(
        opened=sum(p.opened for p in parts),
        failed=sum(p.failed for p in parts),
        seconds=max(p.seconds for p in parts),
        errors=merge_counts(p.errors for p in parts),
    )


def holds(step: Step, p99_ms: float = HOLD_P99_MS) -> bool:
    return not why_not(step, p99_ms)


def why_not(step: Step, p99_ms: float = HOLD_P99_MS) -> str:
    """Empty when the step held; else the first reason it did not."""
    if step.sent < HOLD_SHARE * step.offered * step.duration:
        return f"generator sent only {step.sent_rate:,.0f}/s"
    if step.ack_rate < HOLD_SHARE * step.offered:
        return f"acks lag ({step.ack_rate:,.0f}/s acked)"
    if step.unacked:
        return f"{step.unacked} unacked after drain"
    if not step.e2e.p99 <= p99_ms:
        return f"p99 {step.e2e.p99:,.0f} ms > {p99_ms:.0f} ms"
    return ""


@dataclasses.dataclass(slots=True)
class Sustained:
    rate: float
    windows: list[Step]

    @property
    def median_ack_rate(self) -> float:
        return median(w.ack_rate for w in self.windows)

    @property
    def median_delivery_rate(self) -> float:
        return median(w.delivery_rate for w in self.windows)

    @property
    def median_p50(self) -> float:
        return median(w.e2e.p50 for w in self.windows)

    @property
    def median_p99(self) -> float:
        return median(w.e2e.p99 for w in self.windows)

    @property
    def median_p999(self) -> float:
        return median(w.e2e.p999 for w in self.windows)


Progress = Callable[[str], None]


def sustained(
    swarm: Swarm,
    rate: float,
    windows: int,
    seconds: float,
    drain: float,
    server_pid: Pids,
    progress: Progress,
) -> Sustained:
    out = Sustained(rate=rate, windows=[])
    for i in range(windows):
        step = swarm.run(rate, seconds, drain, server_pid)
        out.windows.append(step)
        progress(f"sustained {rate:,.0f}/s window {i + 1}/{windows}: {brief(step)}")
        _settle(step, server_pid, progress)
    return out


def _settle(step: Step, server_pid: Pids, progress: Progress) -> None:
    """After a step that left a backlog, let the server work it off before the next."""
    if server_pid and why_not(step):
        waited = wait_quiet(server_pid)
        progress(f"waited {waited:.1f}s for the server to go quiet")


@dataclasses.dataclass(slots=True)
class Saturation:
    steps: list[Step]

    @property
    def best(self) -> Step | None:
        held = [s for s in self.steps if holds(s)]
        return max(held, key=lambda s: s.ack_rate) if held else None

    @property
    def max_rate(self) -> float:
        best = self.best
        return best.ack_rate if best is not None else math.nan

    @property
    def stopped_by(self) -> str:
        failed = [s for s in self.steps if not holds(s)]
        if not failed:
            return "highest step reached"
        return f"{failed[-1].offered:,.0f}/s: {why_not(failed[-1])}"


def saturate(
    swarm: Swarm,
    rates: Sequence[float],
    seconds: float,
    drain: float,
    server_pid: Pids,
    progress: Progress,
    *,
    failures: int = 1,
) -> Saturation:
    """Step through ``rates`` until ``failures`` steps in a row do not hold."""
    out = Saturation(steps=[])
    missed = 0
    for rate in rates:
        step = swarm.run(rate, seconds, drain, server_pid)
        out.steps.append(step)
        reason = why_not(step)
        progress(f"step {rate:,.0f}/s: {brief(step)}{'  <- ' + reason if reason else ''}")
        missed = missed + 1 if reason else 0
        _settle(step, server_pid, progress)
        if missed >= failures:
            break
    return out


def brief(step: Step) -> str:
    errors = sum(step.errors.values())
    return (
        f"acked {step.ack_rate:,.0f}/s delivered {step.delivery_rate:,.0f}/s "
        f"e2e p50 {step.e2e.p50:.1f} p99 {step.e2e.p99:.1f} ms, errors {errors}, "
        f"cpu: server {step.server_cpu:.0%} bench {step.client_cpu:.0%} "
        f"other {step.other_cpu:.0%} (of one core)"
    )
