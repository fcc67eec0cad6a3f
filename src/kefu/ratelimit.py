"""A token bucket per connection, driven by a clock the caller passes in."""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens a second, holding at most ``burst``.

    :meth:`take` spends one token and returns 0.0, or returns how many seconds until one
    is available. ``debt`` counts refused attempts since the bucket was last full enough to
    pay, so a caller can tell a client that is merely fast from one that floods.
    """

    __slots__ = ("burst", "debt", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now
        self.debt = 0

    def take(self, now: float) -> float:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.debt = 0
            return 0.0
        self.debt += 1
        return (1.0 - self.tokens) / self.rate
