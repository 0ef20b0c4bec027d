"""What a running pre-copy migration's own rounds say of its end (pure: no I/O, no clock).

The plan predicts a migration from what was measured before it started. Once QEMU has
made its first pass over RAM, the job itself shows how the guest really writes: each
round resends what the guest dirtied during the previous one, so the bytes left at a
round's start (QEMU's remaining bytes just after a dirty-bitmap sync) are the unique
bytes the guest dirtied in a round as long as the previous one, whatever its habit (a
walk, random pages, a hot set, bursts).

``round_starts`` reads the round starts out of the progress samples after the first
pass: from the bytes QEMU reports sent where a sync falls between two samples of
consecutive sync counts, else the first sample at a sync count where what QEMU may have
sent since the sample before is a small part of it (rounds shorter than the sampling
are not seen). Two consecutive ones give a
point of the guest's curve ``f``: unique bytes dirtied in ``t`` seconds, with
``t = R_k / B`` the round's length and ``f(t) = R_(k+1)``. ``f`` is fitted on the last
two such points: where the longer round found fewer bytes per second (the writer
rewrites pages already dirty: a set, a hot part), by ``W * (1 - exp(-D t / W))``, the
unique pages ``D`` bytes/s of writes find in a set of ``W`` (the curve random writes
follow, and a bound for a walk); otherwise by the line ``D t``. One point gives the
line alone.

``forecast(history)``: where the last ``TREND_STARTS`` round starts shrank by less than
``STUCK_RATIO`` per round (the least-squares trend of their logarithm: samples catch a
round start late by a varying amount), the rounds have stopped shrinking; otherwise it
runs the rounds on from the last start, ``R <- f(R / B)`` at the
bandwidth ``B`` now, until one fits QEMU's limit now (``R <= B * L``: it switches over)
or they stop shrinking by ``STUCK_RATIO`` (it will not converge at this limit and this
bandwidth; ``needed_downtime_ms`` is the limit its last round start needs). The job
ends after the final copy with the switch-over (the device state and ``switchover_ms``)
and the clean-up on both hosts (``finish_s``): the remaining time counts them. None
before two round starts after the first pass, in post-copy, or while nothing is sent.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hostmaint.common.dirty import dirtied_curve
from hostmaint.coordinator.model import DEFAULT_PARAMS, ModelParams, margin_ms

if TYPE_CHECKING:
    from hostmaint.coordinator.escalation import Observation

# Rounds shrinking by less than this are not converging (noise, a hot set's floor).
STUCK_RATIO = 0.95
# Round starts the shrink per round is read over, and the fewest that may say it stopped.
TREND_STARTS = 4
MIN_STARTS_STUCK = 3
# The most of a round start the samples may have missed (sent between two samples).
SAMPLE_SLACK = 0.25
_MAX_ROUNDS = 200


@dataclass(frozen=True)
class RoundStart:
    iteration: int
    elapsed_s: float
    remaining_bytes: int


@dataclass(frozen=True)
class Forecast:
    converges: bool
    remaining_s: float  # math.inf when it does not converge
    rounds_left: int
    needed_downtime_ms: float  # the limit its last round start would switch over within
    reason: str
    from_iteration: int = 0  # the sync count of the last round start it read

    @property
    def note(self) -> str:
        """The reason, as an operator reads it beside the revised time."""
        return self.reason if self.converges else f"will not converge as it runs: {self.reason}"


def round_starts(history: Sequence[Observation]) -> list[RoundStart]:
    """The round starts after the first pass that the samples pin down.

    Where the sample before the first one of a sync count is of the sync count before
    and both say what QEMU had sent, the round started with what that sample showed
    left sent (the previous round's end) and what the new round shows sent and left
    since. Otherwise the first sample at the sync count, if what QEMU may have sent since
    the sample before (at the bandwidth then) is at most ``SAMPLE_SLACK`` of what it
    shows left: a round shorter than the samples' spacing is not seen well enough.
    """
    starts: list[RoundStart] = []
    before: Observation | None = None
    for o in history:
        if o.postcopy:
            break
        if o.remaining_bytes <= 0 or o.iteration <= 0:
            continue  # a sample that says nothing of the job (a cloud's record)
        if before is not None and o.iteration > before.iteration and o.iteration >= 2:
            sent_since = o.processed_bytes - before.processed_bytes - before.remaining_bytes
            if o.iteration == before.iteration + 1 and before.processed_bytes and sent_since >= 0:
                starts.append(RoundStart(o.iteration, o.elapsed_s, o.remaining_bytes + sent_since))
            else:
                unseen = o.bandwidth_bytes_per_s * (o.elapsed_s - before.elapsed_s)
                if unseen <= SAMPLE_SLACK * o.remaining_bytes:
                    starts.append(RoundStart(o.iteration, o.elapsed_s, o.remaining_bytes))
        before = o
    return starts


def shrink_per_round(starts: Sequence[RoundStart]) -> float | None:
    """The ratio of one round start to the one before, over these: the least-squares
    slope of log(remaining) by sync count (samples catch a start late by a varying
    amount, so two alone read noise)."""
    pts = [(s.iteration, math.log(s.remaining_bytes)) for s in starts if s.remaining_bytes > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx <= 0:
        return None
    return math.exp(sum((x - mx) * (y - my) for x, y in pts) / sxx)


def forecast(
    history: Sequence[Observation], params: ModelParams = DEFAULT_PARAMS
) -> Forecast | None:
    if not history or history[-1].postcopy:
        return None
    starts = round_starts(history)
    now = history[-1]
    seen = _forecast(now, starts)
    if seen is None:
        return None
    after_copy_s = margin_ms(now.bandwidth_bytes_per_s, params) / 1000.0 + params.finish_s
    return dataclasses.replace(
        seen,
        remaining_s=seen.remaining_s + after_copy_s,
        from_iteration=starts[-1].iteration,
    )


def _forecast(now: Observation, starts: Sequence[RoundStart]) -> Forecast | None:
    bw = now.bandwidth_bytes_per_s
    if len(starts) < 2 or bw <= 0:
        return None
    last = starts[-1]
    needed_ms = last.remaining_bytes / bw * 1000.0
    threshold = bw * now.max_downtime_ms / 1000.0
    if last.remaining_bytes <= threshold:
        return Forecast(True, now.remaining_bytes / bw, 0, needed_ms, "fits the limit now")
    q = shrink_per_round(starts[-TREND_STARTS:])
    if q is None:
        return None
    if q >= STUCK_RATIO:
        if len(starts) < MIN_STARTS_STUCK:
            return None  # two round starts alone may read a late sample
        return _stuck(q * last.remaining_bytes, last, needed_ms)
    points = [
        (a.remaining_bytes / bw, float(b.remaining_bytes))
        for a, b in itertools.pairwise(starts)
        if b.iteration == a.iteration + 1 and a.remaining_bytes > 0
    ]
    # rounds shorter than the samples: the ratio over the gap, as a line
    before = starts[-2]
    f = dirtied_curve(points or [(before.remaining_bytes / bw, before.remaining_bytes * q)])
    rounds, r, from_start_s = 0, float(last.remaining_bytes), 0.0
    while r > threshold:
        nxt = f(r / bw)
        if nxt >= STUCK_RATIO * r or rounds >= _MAX_ROUNDS:
            return _stuck(nxt, last, needed_ms)
        from_start_s += r / bw
        r, rounds = nxt, rounds + 1
    final_s = r / bw
    left_s = max(final_s, from_start_s + final_s - (now.elapsed_s - last.elapsed_s))
    return Forecast(True, left_s, rounds, needed_ms, f"{rounds} more rounds")


def _stuck(floor_bytes: float, last: RoundStart, needed_ms: float) -> Forecast:
    why = (
        f"its rounds stop shrinking near {floor_bytes / 2**20:.0f} MiB: "
        f"{last.remaining_bytes / 2**20:.0f} MiB left at the last sync needs a "
        f"{needed_ms:.0f} ms limit at this bandwidth"
    )
    return Forecast(False, math.inf, 0, needed_ms, why)
