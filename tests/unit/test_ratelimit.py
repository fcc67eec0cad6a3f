"""TokenBucket with an explicit clock."""

from __future__ import annotations

import pytest

from kefu.ratelimit import TokenBucket


def test_starts_full_and_spends_burst() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) == pytest.approx(0.5)
    assert bucket.debt == 1


def test_wait_reflects_partial_tokens() -> None:
    bucket = TokenBucket(rate=4.0, burst=1, now=0.0)
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.125) == pytest.approx(0.125)  # half a token there, half to go
    assert bucket.take(0.25) == 0.0


def test_refills_at_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=5, now=0.0)
    for _ in range(5):
        assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) > 0
    # 0.3 s later: three tokens
    assert [bucket.take(0.3) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.3) > 0


def test_refill_capped_at_burst() -> None:
    bucket = TokenBucket(rate=100.0, burst=2, now=0.0)
    bucket.take(0.0)
    bucket.take(0.0)
    assert [bucket.take(1000.0) for _ in range(2)] == [0.0, 0.0]
    assert bucket.take(1000.0) == pytest.approx(0.01)


def test_steady_rate_never_refused() -> None:
    bucket = TokenBucket(rate=4.0, burst=1, now=0.0)
    for i in range(100):
        assert bucket.take(i * 0.25) == 0.0
    assert bucket.debt == 0


def test_debt_counts_refusals_and_resets_on_success() -> None:
    bucket = TokenBucket(rate=1.0, burst=1, now=0.0)
    assert bucket.take(0.0) == 0.0
    for expected in range(1, 6):
        assert bucket.take(0.1) > 0
        assert bucket.debt == expected
    assert bucket.take(1.0) == 0.0
    assert bucket.debt == 0


def test_refusals_do_not_spend() -> None:
    """A flood of refused attempts must not push the next allowed moment further away."""
    bucket = TokenBucket(rate=1.0, burst=1, now=0.0)
    bucket.take(0.0)
    for _ in range(50):
        bucket.take(0.5)
    assert bucket.take(1.0) == 0.0


def test_clock_going_backwards_does_not_refill() -> None:
    bucket = TokenBucket(rate=1.0, burst=2, now=10.0)
    bucket.take(10.0)
    bucket.take(10.0)
    wait = bucket.take(5.0)
    assert wait == pytest.approx(1.0)
    assert bucket.tokens == 0.0
    assert bucket.take(11.0) == 0.0
