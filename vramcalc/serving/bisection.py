"""The one search the serving answers need: the largest n at which a monotone test still holds."""

from __future__ import annotations

LIMIT = 1 << 22


def largest(test, low: int, limit: int = LIMIT) -> int:
    """Largest n in [low, limit] with test(n) true, given test is true up to some n and false after (``low - 1``
    when test(low) is false): doubling, then bisection, O(log n) calls."""
    if not test(low):
        return low - 1
    high = low
    while high < limit and test(min(high * 2, limit)):
        high = min(high * 2, limit)
    if high >= limit:
        return limit
    top = min(high * 2, limit)
    while top - high > 1:
        mid = (high + top) // 2
        if test(mid):
            high = mid
        else:
            top = mid
    return high
