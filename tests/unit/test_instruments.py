"""kefu.instruments: the loop-thread counters and histograms expose exactly what
prometheus_client's own types do for the same updates (but the optional _created samples)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram as PromHistogram

from kefu.instruments import Counter, Histogram

BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0)


def exposition(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


def twins() -> tuple[CollectorRegistry, CollectorRegistry]:
    return CollectorRegistry(), CollectorRegistry()


@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.floats(min_value=0, max_value=1e6)),
        max_size=30,
    )
)
def test_counters_match_prometheus_client(updates: list[tuple[str, float]]) -> None:
    ours, theirs = twins()
    plain, plain_ref = (
        Counter("x", "plain", registry=ours),
        PromCounter("x", "plain", registry=theirs),
    )
    by, by_ref = (
        Counter("y_total", "labelled", ["kind"], registry=ours),
        PromCounter("y_total", "labelled", ["kind"], registry=theirs),
    )
    for kind, amount in updates:
        plain.inc(amount)
        plain_ref.inc(amount)
        by.labels(kind).inc()
        by_ref.labels(kind=kind).inc()
    assert exposition(ours) == exposition(theirs)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["0", "1"]),
            st.one_of(st.sampled_from(BUCKETS), st.floats(min_value=0, max_value=100)),
        ),
        max_size=40,
    )
)
def test_histograms_match_prometheus_client(updates: list[tuple[str, float]]) -> None:
    ours, theirs = twins()
    plain = Histogram("h", "plain", buckets=BUCKETS, registry=ours)
    plain_ref = PromHistogram("h", "plain", buckets=BUCKETS, registry=theirs)
    by = Histogram("g", "labelled", ["n"], buckets=BUCKETS, registry=ours)
    by_ref = PromHistogram("g", "labelled", ["n"], buckets=BUCKETS, registry=theirs)
    for n, value in updates:  # a value equal to a bound counts in that bound's bucket
        plain.observe(value)
        plain_ref.observe(value)
        by.labels(n=n).observe(value)
        by_ref.labels(n).observe(value)
    assert exposition(ours) == exposition(theirs)


def test_sample_values_are_readable_and_misuse_is_refused() -> None:
    registry = CollectorRegistry()
    counter = Counter("c", "doc", ["a", "b"], registry=registry)
    counter.labels("1", "2").inc(3)
    counter.labels(a="1", b="2").inc()
    assert registry.get_sample_value("c_total", {"a": "1", "b": "2"}) == 4
    with pytest.raises(ValueError, match="labels"):
        counter.inc()
    with pytest.raises(ValueError, match="expected labels"):
        counter.labels("1")
    with pytest.raises(ValueError, match="missing label"):
        counter.labels(a="1", c="2")
    with pytest.raises(ValueError, match="not both"):
        counter.labels("1", b="2")
    with pytest.raises(ValueError, match="only go up"):
        counter.labels("1", "2").inc(-1)
    with pytest.raises(ValueError, match="Duplicated"):  # one name, one metric
        Counter("c", "again", registry=registry)
    with pytest.raises(ValueError, match="bucket"):
        Histogram("h", "doc", buckets=(), registry=registry)
