"""What dirty-rate measurements over doubling windows say of a guest's writer (pure).

libvirt's dirty-rate measurement counts the unique pages dirtied in a window of
whole seconds, over the window. A guest rewriting a working set smaller than a
window of its writes reads as working set / window, not as its write rate (on
the lab: 64.0 MiB/s for 80 MiB/s over a 128 MiB set in 2 s). Windows that double
tell the cases apart: when doubling the window barely adds unique pages, the
writer is rewriting a set it has already covered.

Public API
----------
``Reading(bytes_per_s, window_s)``: one measurement.
``Writer(rate, working_set, rate_floor)``: what the readings tell.
``writer_of(readings) -> Writer`` (readings over windows that double, shortest first):
    * no window saw (almost) any writes, or a single window: its reading is the rate;
    * the first pair of consecutive windows where the longer found at most
      ``SATURATED_GROWTH`` times the shorter one's unique pages has found the working
      set (the longer window's unique bytes);
        - when that pair starts at the shortest window and the longer one still found
          more than noise, ``W (1 - exp(-D t / W))`` through both gives the rate ``D``
          (a hot part rewritten within the window, a cold part beside it);
        - when that pair starts at the shortest window and found no more, the rewrite
          rate is unknown above it: taken as the set rewritten every
          ``ASSUMED_REWRITE_S`` (fast enough
          that every pre-copy round resends all of it: it converges only when the whole
          set fits a switch-over), and ``rate_floor`` is the rate the writer certainly
          reaches (the shortest window's reading: that many unique bytes a second): the
          planner plans with it where the assumed rate leaves only costly tunings, and
          the escalation ladder catches a writer faster than that;
        - later, the shortest window was not yet covering the set: the write rate is
          the highest reading (the shortest window's for a steady writer; a longer
          one's where the shortest caught a writer that bursts idling), and both are
          known;
    * no pair saturated: the highest reading is the write rate and the set unknown.
``next_window_s(readings, nonzero_bytes, max_window_s, min_rate) -> seconds or None``:
    the next, doubled window worth measuring: none when the set is found, the writer is
    slower than ``min_rate`` (it converges whatever its set: not worth the wait), the
    last window saw nearly all its non-zero memory (a longer one cannot tell more) or
    the double exceeds ``max_window_s``.
``readings_of(rate, working_set, windows_s) -> readings``: what those windows read of a
    writer of that rate over that working set (the benchmark's agents).
``dirtied_curve(points) -> f``: unique bytes dirtied in ``t`` seconds, through the last two
    ``(t, bytes)`` points: where the longer one found fewer bytes per second (the writer
    rewrites pages already dirty: a set, a hot part), ``W * (1 - exp(-D t / W))``, the
    unique pages ``D`` bytes/s of writes find in a set of ``W`` (the curve random writes
    follow, and a bound for a walk); otherwise the line ``D t``; one point: the line.
``saturating_fit(ta, ya, tb, yb) -> (W, D) or None``: that curve's set and rate through two
    points (``writer_of`` reads a hot part's rate with it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

SATURATED_GROWTH = 1.25
# Longer windows are worth their wait for writers of at least this share of the link: a
# slower one converges in a few rounds whatever its working set.
LONGER_WINDOW_LINK_SHARE = 0.1
ASSUMED_REWRITE_S = 0.1
_NOISE_BYTES = 1024 * 1024  # below this a window saw (almost) no writes
_BISECTIONS = 100


@dataclass(frozen=True)
class Reading:
    bytes_per_s: float
    window_s: float

    @property
    def unique_bytes(self) -> float:
        return self.bytes_per_s * self.window_s


@dataclass(frozen=True)
class Writer:
    rate_bytes_per_s: float
    working_set_bytes: int | None = None
    rate_floor_bytes_per_s: float | None = None


def _saturated_at(readings: Sequence[Reading]) -> int | None:
    """Index of the longer window of the first pair that found the set."""
    for i in range(1, len(readings)):
        short, long = readings[i - 1], readings[i]
        if long.window_s > short.window_s and (
            long.unique_bytes <= SATURATED_GROWTH * short.unique_bytes
        ):
            return i
    return None


def writer_of(readings: Sequence[Reading]) -> Writer:
    if not readings:
        return Writer(0.0)
    first = readings[0]
    if len(readings) < 2 or first.unique_bytes < _NOISE_BYTES:
        return Writer(max(r.bytes_per_s for r in readings))
    at = _saturated_at(readings)
    if at is None:
        return Writer(_steady_rate(readings))
    working_set = max(readings[at - 1].unique_bytes, readings[at].unique_bytes)
    if at == 1:
        second = readings[1]
        if second.unique_bytes > first.unique_bytes + _NOISE_BYTES:
            # the longer window still found some: the curve through both tells the rate
            fit = saturating_fit(
                first.window_s, first.unique_bytes, second.window_s, second.unique_bytes
            )
            if fit is not None:
                return Writer(max(fit[1], first.bytes_per_s), int(working_set), first.bytes_per_s)
        rate = max(first.bytes_per_s, working_set / ASSUMED_REWRITE_S)
        return Writer(rate, int(working_set), first.bytes_per_s)
    return Writer(_steady_rate(readings), int(working_set))


def _steady_rate(readings: Sequence[Reading]) -> float:
    """The write rate where the shortest window did not cover the set: a window's unique
    bytes over its length are at most the mean write rate in it, so no window may read
    more than the rate. A steady writer reads most in the shortest window; a writer
    that alternates writing and idling reads less there whenever that window caught an
    idle spell, and a longer window's reading then comes nearer its mean."""
    return max(r.bytes_per_s for r in readings)


def next_window_s(
    readings: Sequence[Reading],
    nonzero_bytes: float,
    max_window_s: float,
    min_rate_bytes_per_s: float = 0.0,
) -> float | None:
    if (
        not readings
        or readings[0].unique_bytes < _NOISE_BYTES
        or readings[0].bytes_per_s < min_rate_bytes_per_s
        or _saturated_at(readings)
    ):
        return None
    last = readings[-1]
    if last.unique_bytes * SATURATED_GROWTH >= nonzero_bytes:
        return None
    window = 2 * last.window_s
    return window if window <= max_window_s else None


def readings_of(
    rate_bytes_per_s: float, working_set_bytes: float, windows_s: Sequence[float]
) -> tuple[Reading, ...]:
    """The readings of a writer of that rate over that working set."""
    return tuple(Reading(min(rate_bytes_per_s * w, working_set_bytes) / w, w) for w in windows_s)


def dirtied_curve(points: Sequence[tuple[float, float]]) -> Callable[[float], float]:
    """Unique bytes dirtied in t seconds, through the last two (t, bytes) points."""
    t1, y1 = points[-1]
    if len(points) >= 2:
        t0, y0 = points[-2]
        (ta, ya), (tb, yb) = sorted([(t0, y0), (t1, y1)])  # ta < tb
        if ta > 0 and tb > ta and yb > ya > 0 and yb / tb < ya / ta:
            return _saturating(ta, ya, tb, yb)
    rate = y1 / t1 if t1 > 0 else 0.0
    return lambda t: rate * t


def _saturating(ta: float, ya: float, tb: float, yb: float) -> Callable[[float], float]:
    """``W (1 - exp(-D t / W))`` through both points (ta < tb, ya < yb, yb/tb < ya/ta)."""
    fit = saturating_fit(ta, ya, tb, yb)
    if fit is None:  # indistinguishable from the line through b
        return lambda t: yb / tb * t
    w, d = fit
    return lambda t: w * (1.0 - math.exp(-d * t / w))


def saturating_fit(ta: float, ya: float, tb: float, yb: float) -> tuple[float, float] | None:
    """``(W, D)`` of ``W (1 - exp(-D t / W))`` through both points (ta < tb, ya < yb,
    yb/tb < ya/ta): the set and the write rate; None when no set shows (a line)."""

    def through_b(w: float) -> float:
        d = -w / tb * math.log(1.0 - yb / w)
        return w * (1.0 - math.exp(-d * ta / w)) - ya

    lo, hi = yb * (1 + 1e-9), yb * 1e6
    if through_b(hi) > 0:
        return None
    for _ in range(_BISECTIONS):
        mid = math.sqrt(lo * hi)
        if through_b(mid) > 0:
            lo = mid
        else:
            hi = mid
    w = hi
    return w, -w / tb * math.log(1.0 - yb / w)
