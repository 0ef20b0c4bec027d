"""What two dirty-rate measurements say of a guest's writer (pure).

libvirt's dirty-rate measurement counts the unique pages dirtied in a window of
whole seconds, over the window. A guest rewriting a working set smaller than a
window of its writes reads as working set / window, not as its write rate (on
the lab: 64.0 MiB/s for 80 MiB/s over a 128 MiB set in 2 s). Two windows tell
the cases apart: when doubling the window barely adds unique pages, the writer
is rewriting a set it has already covered.

Public API
----------
``Reading(bytes_per_s, window_s)``: one measurement.
``writer_from(short, long) -> (rate bytes/s, working set bytes or None)``:
    * the long window found at most ``SATURATED_GROWTH`` times the short one's unique
      pages: the working set is the long window's unique bytes, and its rewrite rate is
      unknown above the short reading; taken as the set rewritten every
      ``ASSUMED_REWRITE_S`` (fast enough that every pre-copy round resends all of it:
      it converges only when the whole set fits a switch-over);
    * otherwise the short reading is the write rate and the working set is unknown.
``rate_floor(short, long) -> bytes/s or None``: when the windows found the working set,
    the rate the writer certainly reaches (the set over the short window): the planner
    plans with it where the assumed rate leaves only costly tunings, and the escalation
    ladder catches a writer faster than that; None when the rate was read directly.
``readings_of(rate, working_set, short_s, long_s) -> (short, long)``: what the two
    windows read of a writer of that rate over that working set (the benchmark's agents).
"""

from __future__ import annotations

from dataclasses import dataclass

SATURATED_GROWTH = 1.25
ASSUMED_REWRITE_S = 0.1
_NOISE_BYTES = 1024 * 1024  # below this a window saw (almost) no writes


@dataclass(frozen=True)
class Reading:
    bytes_per_s: float
    window_s: float

    @property
    def unique_bytes(self) -> float:
        return self.bytes_per_s * self.window_s


def writer_from(short: Reading, long: Reading) -> tuple[float, int | None]:
    if long.window_s <= short.window_s or short.unique_bytes < _NOISE_BYTES:
        return max(short.bytes_per_s, long.bytes_per_s), None
    if long.unique_bytes <= SATURATED_GROWTH * short.unique_bytes:
        working_set = max(short.unique_bytes, long.unique_bytes)
        return max(short.bytes_per_s, working_set / ASSUMED_REWRITE_S), int(working_set)
    return short.bytes_per_s, None


def rate_floor(short: Reading, long: Reading) -> float | None:
    rate, working_set = writer_from(short, long)
    if working_set is None:
        return None
    return min(rate, working_set / short.window_s)


def readings_of(
    rate_bytes_per_s: float, working_set_bytes: float, short_s: float, long_s: float
) -> tuple[Reading, Reading]:
    """The two readings of a writer of that rate over that working set."""
    return (
        Reading(min(rate_bytes_per_s * short_s, working_set_bytes) / short_s, short_s),
        Reading(min(rate_bytes_per_s * long_s, working_set_bytes) / long_s, long_s),
    )
