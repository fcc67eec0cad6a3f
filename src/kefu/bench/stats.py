"""Pure arithmetic of the benchmark: percentiles, address spreading, pair placement.

Nothing here does I/O, so all of it is unit-tested (tests/unit/test_bench_stats.py).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

#: Ports the kernel hands out per source address (net.ipv4.ip_local_port_range is
#: 32768-60999 by default, about 28k); we stay below it with some margin.
PORTS_PER_ADDRESS = 25_000


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 < q <= 100) by the nearest-rank method; NaN when empty."""
    if not 0 < q <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {q}")
    n = len(sorted_values)
    if n == 0:
        return math.nan
    rank = math.ceil(q / 100.0 * n - 1e-9)
    return sorted_values[min(max(rank, 1), n) - 1]


@dataclasses.dataclass(frozen=True, slots=True)
class Latency:
    """A latency distribution, in milliseconds."""

    count: int
    p50: float
    p99: float
    p999: float
    max: float

    @classmethod
    def of(cls, seconds: Iterable[float]) -> Latency:
        values = sorted(seconds)
        if not values:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        ms = 1000.0
        return cls(
            count=len(values),
            p50=percentile(values, 50) * ms,
            p99=percentile(values, 99) * ms,
            p999=percentile(values, 99.9) * ms,
            max=values[-1] * ms,
        )


def median(values: Iterable[float]) -> float:
    """The median of the finite values; NaN when there are none."""
    data = sorted(v for v in values if not math.isnan(v))
    if not data:
        return math.nan
    mid = len(data) // 2
    return data[mid] if len(data) % 2 else (data[mid - 1] + data[mid]) / 2.0


def merge_counts(parts: Iterable[dict[str, int]]) -> dict[str, int]:
    """Sum per-code counters from several workers, largest first."""
    total: Counter[str] = Counter()
    for part in parts:
        total.update(part)
    return dict(total.most_common())


def source_addresses(
    connections: int, *, per_address: int = PORTS_PER_ADDRESS, minimum: int = 2, first: int = 2
) -> list[str]:
    """Loopback source addresses for ``connections`` client sockets: 127.0.0.2, .3, ...
    (127.0.0.``first``, ... when several groups of sockets must not share addresses).

    Each bound source address has its own ~28k ephemeral ports; we use enough addresses to
    stay under ``per_address`` each, and at least ``minimum`` so spreading is always on.
    """
    if connections < 0 or per_address < 1 or minimum < 1 or first < 2:
        raise ValueError("connections must be >= 0, per_address and minimum >= 1, first >= 2")
    count = max(minimum, math.ceil(connections / per_address))
    if first + count - 1 > 254:
        raise ValueError(f"{connections} connections need loopback addresses past 127.0.0.254")
    return [f"127.0.0.{first + i}" for i in range(count)]


def spread(index: int, items: Sequence[str]) -> str:
    """Round-robin: the item that connection number ``index`` uses."""
    return items[index % len(items)]


def worker_of_pair(pair: int, workers: int) -> int:
    """Which worker process drives pair ``pair``: both ends of a pair share one process
    (and so one clock for end-to-end latency); pairs are dealt round-robin."""
    return pair % workers


def split_rate(rate: float, weights: Sequence[int]) -> list[float]:
    """Share a total message rate among workers in proportion to their pairs."""
    total = sum(weights)
    if total <= 0:
        return [0.0 for _ in weights]
    return [rate * w / total for w in weights]


def workers_for(connections: int, *, per_worker: int = 5_000, minimum: int = 2) -> int:
    """How many client processes to use: about ``per_worker`` sockets each (the file
    limit is per process), and at least ``minimum`` to use both cores."""
    return max(minimum, math.ceil(connections / per_worker))


def is_loopback_url(url: str) -> bool:
    """True when ``url`` is http(s)/ws(s) on a loopback host: the bench never leaves it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


def rate_steps(start: float, factor: float, limit: float, *, max_steps: int = 20) -> list[float]:
    """Geometric rate steps ``start, start*factor, ...`` up to ``limit`` (bounded count)."""
    if start <= 0 or factor <= 1 or limit < start:
        raise ValueError("need start > 0, factor > 1 and limit >= start")
    steps: list[float] = []
    rate = start
    while rate <= limit * (1 + 1e-9) and len(steps) < max_steps:
        steps.append(round(rate))
        rate *= factor
    return steps


def per_connection_rate(rate: float, connections: int) -> float:
    """Frames a second each sending connection carries when ``rate`` is spread evenly."""
    return rate / connections if connections else math.inf


def prom_value(text: str, name: str) -> float:
    """The value of an unlabelled sample ``name`` in Prometheus text; NaN if absent."""
    prefix = name + " "
    for line in text.splitlines():
        if line.startswith(prefix):
            try:
                return float(line[len(prefix) :].split()[0])
            except (IndexError, ValueError):
                return math.nan
    return math.nan


def prom_samples(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text exposition, keyed by its name with its labels as
    written (``kefu_cluster_deliveries_total{path="remote"}``); comments are skipped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        # The value follows the last space outside the label set (label values may hold
        # spaces); an optional timestamp after it is not used by the node.
        close = line.rfind("}")
        head, _, rest = line[close + 1 :].partition(" ") if close >= 0 else line.partition(" ")
        key = line[: close + 1] if close >= 0 else head
        value = rest.split()[0] if rest.split() else ""
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


def sample_sum(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of the parsed samples (:func:`prom_samples`) of ``name`` whose labels
    include ``labels`` (0 if none)."""
    total = 0.0
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base == name and all(w in rest for w in want):
            total += value
    return total
