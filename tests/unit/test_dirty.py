"""Reading a writer out of dirty-rate windows that double."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostmaint.common.dirty import (
    ASSUMED_REWRITE_S,
    Reading,
    Writer,
    curve_of,
    next_window_s,
    readings_of,
    writer_of,
)
from hostmaint.coordinator.model import GIB, MIB


def test_readings_count_unique_pages() -> None:
    # the lab's wide guest: 80 MiB/s over 128 MiB reads 80 in 1 s and 64 MiB/s in 2 s
    short, long = readings_of(80 * MIB, 128 * MIB, (1.0, 2.0))
    assert (short.bytes_per_s, long.bytes_per_s) == (80 * MIB, 64 * MIB)


def test_a_writer_wider_than_its_windows_reads_as_its_rate() -> None:
    assert writer_of(readings_of(80 * MIB, 128 * MIB, (1.0, 2.0))) == Writer(80 * MIB)
    assert writer_of(readings_of(12 * MIB, 32 * MIB, (1.0, 2.0))) == Writer(12 * MIB)


def test_a_set_rewritten_within_the_first_window_is_found_and_its_rate_assumed_high() -> None:
    # the lab's hot guest: 80 MiB/s over 32 MiB reads 32 then 16 MiB/s
    w = writer_of(readings_of(80 * MIB, 32 * MIB, (1.0, 2.0)))
    assert w.working_set_bytes == 32 * MIB
    assert w.rate_bytes_per_s == 32 * MIB / ASSUMED_REWRITE_S
    # at least the set in the 1 s window: what the planner may plan with
    assert w.rate_floor_bytes_per_s == 32 * MIB


def test_a_set_found_by_a_longer_window_gives_rate_and_set() -> None:
    # 1 GiB/s over 3 GiB: 1 s and 2 s grow, 4 s and 8 s both see 3 GiB
    readings = readings_of(1 * GIB, 3 * GIB, (1.0, 2.0, 4.0, 8.0))
    assert writer_of(readings) == Writer(1 * GIB, 3 * GIB)
    assert writer_of(readings[:3]) == Writer(1 * GIB)  # 4 s alone did not tell yet


def test_one_window_or_an_idle_guest_says_nothing_of_the_set() -> None:
    assert writer_of([Reading(5 * MIB, 2.0)]) == Writer(5 * MIB)
    assert writer_of([Reading(5 * MIB, 2.0), Reading(5 * MIB, 2.0)]) == Writer(5 * MIB)
    assert writer_of([Reading(0.0, 1.0), Reading(0.0, 2.0)]) == Writer(0.0)
    assert writer_of([]) == Writer(0.0)


def test_longer_windows_only_while_they_can_tell_more() -> None:
    wide = readings_of(1 * GIB, 3 * GIB, (1.0, 2.0))
    assert next_window_s(wide, 10 * GIB, 8.0) == 4.0
    assert next_window_s(readings_of(1 * GIB, 3 * GIB, (1.0, 2.0, 4.0)), 10 * GIB, 8.0) == 8.0
    assert next_window_s(wide, 10 * GIB, 2.0) is None  # longer than allowed
    assert next_window_s(wide, 2.2 * GIB, 8.0) is None  # it saw nearly all it could write
    assert next_window_s(wide, 10 * GIB, 8.0, min_rate_bytes_per_s=2 * GIB) is None  # slow
    found = readings_of(80 * MIB, 32 * MIB, (1.0, 2.0))
    assert next_window_s(found, 10 * GIB, 8.0) is None
    assert next_window_s([Reading(0.0, 1.0), Reading(0.0, 2.0)], 10 * GIB, 8.0) is None


@given(
    rate=st.floats(1 * MIB, 4096 * MIB),
    ws=st.floats(1 * MIB, 65536 * MIB),
    nonzero=st.floats(1 * MIB, 65536 * MIB),
)
def test_never_reads_a_writer_slower_than_its_short_window_saw(
    rate: float, ws: float, nonzero: float
) -> None:
    windows = [1.0, 2.0]
    while (longer := next_window_s(readings_of(rate, ws, windows), nonzero, 8.0)) is not None:
        assert longer == 2 * windows[-1] <= 8.0
        windows.append(longer)
    readings = readings_of(rate, ws, windows)
    seen = writer_of(readings)
    assert seen.rate_bytes_per_s >= readings[0].bytes_per_s
    if seen.working_set_bytes is not None:  # a found set is the set itself: a window saw all
        assert abs(seen.working_set_bytes - ws) <= 1.0
        assert seen.rate_bytes_per_s >= rate * min(1.0, ws / rate / ASSUMED_REWRITE_S) - 1e-6
        if seen.rate_floor_bytes_per_s is None:  # read directly: the rate itself
            assert abs(seen.rate_bytes_per_s - rate) <= 1e-6 * rate
        else:
            assert seen.rate_floor_bytes_per_s <= rate + 1e-6 * rate


def _random_writer(rate: float, ws: float, windows: tuple[float, ...]) -> list[Reading]:
    """What windows read of uniformly random writes: the unique pages found."""
    return [Reading(ws * (1 - math.exp(-rate * w / ws)) / w, w) for w in windows]


def test_the_curve_of_random_writes_follows_them_between_and_past_the_windows() -> None:
    rate, ws = 16 * MIB, 96 * MIB
    f = curve_of(_random_writer(rate, ws, (1, 2, 4, 8)))
    for t in (0.1, 0.5, 1.5, 3.0, 6.0, 12.0):
        assert f(t) == pytest.approx(ws * (1 - math.exp(-rate * t / ws)), rel=0.02)
    assert f(0.1) / 0.1 > f(1.0)  # rounds shorter than the first window: the fuller slope


def test_the_curve_of_a_walk_is_its_line_and_a_set_found_in_one_window_stays_flat() -> None:
    walk = curve_of(readings_of(12 * MIB, 96 * MIB, (1, 2, 4)))
    assert [walk(t) / MIB for t in (0.5, 1, 3, 4)] == pytest.approx([6, 12, 36, 48])
    small = curve_of(readings_of(80 * MIB, 8 * MIB, (1, 2)))  # rewritten within 1 s
    assert small(ASSUMED_REWRITE_S / 2) == pytest.approx(4 * MIB)
    assert small(0.5) == small(5.0) == pytest.approx(8 * MIB)
    assert curve_of([])(3.0) == 0.0


def test_a_hot_part_then_a_cold_part_read_as_a_steep_start_and_a_slow_rise() -> None:
    hot, cold = 12 * MIB, 120 * MIB  # 90 % of 24 MiB/s into the hot part, 10 % into the cold

    def found(t: float) -> float:
        return hot * (1 - math.exp(-21.6 * MIB * t / hot)) + cold * (
            1 - math.exp(-2.4 * MIB * t / cold)
        )

    f = curve_of([Reading(found(w) / w, w) for w in (1, 2, 4, 8)])
    # within a short round the hot part dominates: far more than the first window's rate
    assert f(0.25) == pytest.approx(found(0.25), rel=0.1)
    assert f(0.25) / 0.25 > 1.3 * found(1.0)
    assert f(6.0) == pytest.approx(found(6.0), rel=0.05)
    assert (f(8.0) - f(4.0)) / 4 < found(1.0) / 3  # then it grows at the cold part's pace


@given(
    st.lists(st.floats(0.0, 200.0), min_size=1, max_size=5),
)
def test_the_curve_never_falls(rates: list[float]) -> None:
    readings = [Reading(r * MIB, 2.0**i) for i, r in enumerate(rates)]
    f = curve_of(readings)
    ts = [0.05 * 1.3**k for k in range(40)]
    ys = [f(t) for t in ts]
    assert all(b >= a - 1e-6 * MIB for a, b in itertools.pairwise(ys))
