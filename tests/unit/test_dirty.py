"""Reading a writer out of dirty-rate windows that double."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from hostmaint.common.dirty import (
    ASSUMED_REWRITE_S,
    SATURATED_GROWTH,
    Reading,
    Writer,
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


def test_a_hot_part_found_within_the_first_window_reads_its_rate_off_the_curve() -> None:
    hot, cold = 16 * MIB, 120 * MIB  # 40 MiB/s into the hot part, 2 MiB/s into the cold

    def found(t: float) -> float:
        return hot * (1 - math.exp(-40 * MIB * t / hot)) + cold * (
            1 - math.exp(-2 * MIB * t / cold)
        )

    readings = [Reading(found(w) / w, w) for w in (1, 2)]
    assert readings[1].unique_bytes <= SATURATED_GROWTH * readings[0].unique_bytes  # "a set"
    seen = writer_of(readings)
    # the curve through both windows: close to the hot part's rate, not the 1 s reading
    # (which it exceeds) nor the set rewritten every ASSUMED_REWRITE_S (far above)
    assert 25 * MIB < seen.rate_bytes_per_s < 45 * MIB
    assert seen.working_set_bytes == int(found(2))
    assert seen.rate_floor_bytes_per_s == readings[0].bytes_per_s
    flat = writer_of(readings_of(80 * MIB, 8 * MIB, (1.0, 2.0)))  # found no more: assumed
    assert flat.rate_bytes_per_s == 8 * MIB / ASSUMED_REWRITE_S


def test_a_writer_that_idles_in_bursts_reads_at_least_what_any_window_saw() -> None:
    # 24 MiB/s for 1 s, idle for 1 s, over 96 MiB: the 1 s window caught mostly idling
    readings = [Reading(3 * MIB, 1), Reading(12 * MIB, 2), Reading(12 * MIB, 4)]
    assert writer_of(readings) == Writer(12 * MIB)  # no window may read above the mean
    with_set = [*readings, Reading(12 * MIB, 8), Reading(6 * MIB, 16)]  # 96 MiB found
    assert writer_of(with_set) == Writer(12 * MIB, 96 * MIB)
    # a steady writer reads most in its shortest window: that reading stays the rate
    assert writer_of(readings_of(20 * MIB, 1 * GIB, (1.0, 2.0, 4.0))) == Writer(20 * MIB)
