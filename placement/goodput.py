"""Goodput: the highest arrival rate whose SLO attainment still reaches the target.

Owns the rate search over any ``attainment(rate) -> float`` function (a simulation): bracket the
crossing by doubling or halving from a hint, bisect geometrically to a relative tolerance, then
interpolate linearly between the last passing and the first failing rate (ALGORITHMS.md §1). It
does not simulate. Every evaluated point is kept for the attainment-vs-rate plot.

    attainment
      1 ┤■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■
    0.9 ┤- - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - -■- - target
        │                                                          lo ■   (interp.) ╳  ■ hi
      0 ┼──────────────────────────────────────────────────────────────────────────────▶ rate
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class GoodputResult:
    rate_per_s: float  # 0.0 when even the lowest rate tried misses the target
    points: tuple[tuple[float, float], ...]  # (rate, attainment) evaluated, in rate order
    is_capped: bool = False  # the target was still met at the highest rate tried

    def attainment_at(self, rate_per_s: float) -> float | None:
        return next((a for r, a in self.points if r == rate_per_s), None)


def find_goodput(
    attainment: Callable[[float], float],
    target: float,
    hint_rate: float,
    rel_tol: float = 0.03,
    max_doublings: int = 12,
) -> GoodputResult:
    """Search the rate at which ``attainment`` crosses ``target`` (assumed non-increasing)."""
    if not 0 < target <= 1:
        raise ValueError(f"attainment target must be in (0, 1], got {target}")
    if not hint_rate > 0 or not math.isfinite(hint_rate):
        raise ValueError(f"hint rate must be positive and finite, got {hint_rate}")
    seen: dict[float, float] = {}

    def att(rate: float) -> float:
        if rate not in seen:
            seen[rate] = attainment(rate)
        return seen[rate]

    def result(rate: float, capped: bool = False) -> GoodputResult:
        return GoodputResult(rate, tuple(sorted(seen.items())), capped)

    lo, hi = hint_rate, hint_rate
    if att(hint_rate) >= target:
        for _ in range(max_doublings):
            hi *= 2
            if att(hi) < target:
                break
            lo = hi
        else:
            return result(lo, capped=True)
    else:
        for _ in range(max_doublings):
            lo /= 2
            if att(lo) >= target:
                break
            hi = lo
        else:
            return result(0.0)
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        if att(mid) >= target:
            lo = mid
        else:
            hi = mid
    a_lo, a_hi = seen[lo], seen[hi]
    rate = lo
    if a_lo > a_hi:  # linear interpolation of the crossing inside [lo, hi]
        rate = lo + (a_lo - target) / (a_lo - a_hi) * (hi - lo)
    return result(min(max(rate, lo), hi))
