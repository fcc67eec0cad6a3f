"""Counters and histograms cheap enough for the per-message path.

prometheus_client's ``Counter.inc`` and ``Histogram.observe`` take a lock and check the
metric's state on every call, 1-3 µs each, and a node updates about ten metrics per chat
message. A node updates its metrics from its event-loop thread only, so these keep plain
numbers and hand them to the registry as metric families when it is collected (a scrape,
``registry.get_sample_value``). The exposition is the same as prometheus_client's own
types (``NAME_total``; ``NAME_bucket{le=...}``, ``NAME_count``, ``NAME_sum``), without the
optional ``_created`` samples.

Not for metrics updated from other threads (an increment there could be lost): those stay
prometheus_client types (see :class:`kefu.metrics.Metrics`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

V = TypeVar("V")
#: How prometheus_client writes a bucket bound (``0.005``, ``1.0``, ``+Inf``).
_bound_text: Callable[[float], str] = floatToGoString


class _Labelled(Generic[V]):
    """The label bookkeeping both types share: a value, or a child value per label values."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        make: Callable[[], V],
    ) -> None:
        self.name = name.removesuffix("_total")
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._make = make
        self._value = make()
        self._children: dict[tuple[str, ...], V] = {}
        registry.register(self)

    def labels(self, *values: str, **named: str) -> V:
        if not named:  # the common case: values given in order, seen before
            child = self._children.get(values)
            if child is not None:
                return child
        key = self._values(values, named)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._make()
        return child

    def _series(self) -> list[tuple[list[str], V]]:
        if self.labelnames:
            return [(list(key), child) for key, child in list(self._children.items())]
        return [([], self._value)]

    def _unlabelled(self) -> V:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use .labels(...)")
        return self._value

    def _values(self, values: tuple[str, ...], named: dict[str, str]) -> tuple[str, ...]:
        if named:
            if values:
                raise ValueError("labels: positional or keyword values, not both")
            try:
                values = tuple(str(named[n]) for n in self.labelnames)
            except KeyError as exc:
                raise ValueError(f"{self.name}: missing label {exc}") from None
            if len(named) != len(self.labelnames):
                raise ValueError(f"{self.name}: unknown labels {sorted(named)}")
        elif len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        return tuple(str(v) for v in values)

    def describe(self) -> list[Metric]:
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:  # pragma: no cover - overridden
        raise NotImplementedError


class CounterValue:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class Counter(_Labelled[CounterValue]):
    """A counter; with ``labelnames``, one per label values (:meth:`labels`)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        super().__init__(name, documentation, labelnames, registry, CounterValue)

    def inc(self, amount: float = 1.0) -> None:
        self._unlabelled().inc(amount)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in self._series():
            family.add_metric(key, child.value)
        yield family


class HistogramValue:
    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bucket i counts values <= bounds[i]: the first bound not below the value
        self.counts[bisect.bisect_left(self._bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, count in zip((*self._bounds, math.inf), self.counts, strict=True):
            total += count
            out.append((_bound_text(bound), float(total)))
        return out


class Histogram(_Labelled[HistogramValue]):
    """A histogram with fixed bucket bounds; with ``labelnames``, one per label values."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = tuple(sorted(float(b) for b in buckets if b != math.inf))
        if not bounds:
            raise ValueError("a histogram needs at least one finite bucket bound")
        super().__init__(name, documentation, labelnames, registry, lambda: HistogramValue(bounds))

    def observe(self, value: float) -> None:
        self._unlabelled().observe(value)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in self._series():
            family.add_metric(key, child.buckets(), child.sum)
        yield family
