"""Reading a writer out of two dirty-rate windows."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hostmaint.coordinator.dirty import (
    ASSUMED_REWRITE_S,
    Reading,
    rate_floor,
    readings_of,
    writer_from,
)
from hostmaint.coordinator.model import MIB


def test_readings_count_unique_pages() -> None:
    # the lab's wide guest: 80 MiB/s over 128 MiB reads 80 in 1 s and 64 MiB/s in 2 s
    short, long = readings_of(80 * MIB, 128 * MIB, 1.0, 2.0)
    assert (short.bytes_per_s, long.bytes_per_s) == (80 * MIB, 64 * MIB)


def test_a_writer_wider_than_its_windows_reads_as_its_rate() -> None:
    assert writer_from(*readings_of(80 * MIB, 128 * MIB, 1.0, 2.0)) == (80 * MIB, None)
    assert writer_from(*readings_of(12 * MIB, 32 * MIB, 1.0, 2.0)) == (12 * MIB, None)


def test_a_set_rewritten_within_a_window_is_found_and_its_rate_assumed_high() -> None:
    # the lab's hot guest: 80 MiB/s over 32 MiB reads 32 then 16 MiB/s
    rate, ws = writer_from(*readings_of(80 * MIB, 32 * MIB, 1.0, 2.0))
    assert ws == 32 * MIB
    assert rate == 32 * MIB / ASSUMED_REWRITE_S


def test_one_window_or_an_idle_guest_says_nothing_of_the_set() -> None:
    assert writer_from(Reading(5 * MIB, 2.0), Reading(5 * MIB, 2.0)) == (5 * MIB, None)
    assert writer_from(Reading(0.0, 1.0), Reading(0.0, 2.0)) == (0.0, None)


@given(
    rate=st.floats(1 * MIB, 4096 * MIB),
    ws=st.floats(1 * MIB, 65536 * MIB),
)
def test_never_reads_a_writer_slower_than_its_short_window_saw(rate: float, ws: float) -> None:
    short, long = readings_of(rate, ws, 1.0, 2.0)
    seen_rate, seen_ws = writer_from(short, long)
    assert seen_rate >= short.bytes_per_s
    if seen_ws is not None:  # a found set is the set itself: the windows saw all of it
        assert abs(seen_ws - ws) <= 1.0
        assert seen_rate >= rate * min(1.0, ws / rate / ASSUMED_REWRITE_S) - 1e-6


def test_a_found_set_gives_the_rate_floor_a_direct_reading_none() -> None:
    # 80 MiB/s over 32 MiB: at least 32 MiB/s (the set in the 1 s window)
    assert rate_floor(*readings_of(80 * MIB, 32 * MIB, 1.0, 2.0)) == 32 * MIB
    assert rate_floor(*readings_of(80 * MIB, 128 * MIB, 1.0, 2.0)) is None
