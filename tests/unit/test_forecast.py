"""The forecast a running migration's own rounds give: guests of several write habits,
simulated round by round from what each dirties in a round of a given length."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostmaint.coordinator.calibrate import first_forecast
from hostmaint.coordinator.escalation import Observation
from hostmaint.coordinator.forecast import STUCK_RATIO, forecast, round_starts
from hostmaint.coordinator.model import DEFAULT_PARAMS, margin_ms

MIB = 2**20
BW = 50 * MIB  # bytes/s the migration gets
LIMIT_MS = 300


def uniform(rate: float, ws: float) -> Callable[[float], float]:
    """Random pages over a set: unique bytes dirtied in t seconds (coupon collecting)."""
    return lambda t: ws * (1 - math.exp(-rate * t / ws))


def hot_cold(rate: float, hot: float, cold: float, hot_share: float) -> Callable[[float], float]:
    return lambda t: uniform(rate * hot_share, hot)(t) + uniform(rate * (1 - hot_share), cold)(t)


def walk(rate: float, ws: float) -> Callable[[float], float]:
    return lambda t: min(rate * t, ws)


def run(dirtied: Callable[[float], float], first_pass_bytes: float, sample_s: float = 0.25):
    """Samples of a pre-copy migration, every sample_s, until it switches over (or 60 s).

    Returns the samples and when the job ended (None: it did not switch over): the final
    copy, the switch-over and the clean-up after it."""
    t, it, remaining = 0.0, 1, first_pass_bytes
    samples: list[Observation] = []
    next_sample = 0.0
    threshold = BW * LIMIT_MS / 1000
    while t < 60.0:
        round_s = remaining / BW
        end = t + round_s
        while next_sample < end:
            left = remaining - (next_sample - t) * BW
            samples.append(Observation(next_sample, it, int(left), BW, LIMIT_MS))
            next_sample += sample_s
        t = end
        remaining = dirtied(round_s)
        it += 1
        if remaining <= threshold:
            return samples, t + remaining / BW + margin_ms(BW) / 1000 + DEFAULT_PARAMS.finish_s
    return samples, None


@pytest.mark.parametrize(
    "name,dirtied",
    [
        ("walk", walk(20 * MIB, 256 * MIB)),
        ("uniform", uniform(30 * MIB, 512 * MIB)),
        ("hot-cold", hot_cold(40 * MIB, 16 * MIB, 480 * MIB, 0.8)),
    ],
)
def test_a_converging_guest_is_forecast_to_converge_near_its_real_end(name, dirtied) -> None:
    # sampled often enough to pin its round starts down (the agent samples as asked)
    samples, ended = run(dirtied, first_pass_bytes=1024 * MIB, sample_s=0.1)
    assert ended is not None, name
    f = first_forecast(samples)
    assert f is not None and f.converges, (name, f)
    real_left = ended - f.at_s
    assert f.end_s - f.at_s == pytest.approx(real_left, rel=0.35, abs=1.0), (name, f, real_left)


@pytest.mark.parametrize(
    "name,dirtied",
    [
        ("uniform over a big set", uniform(60 * MIB, 1024 * MIB)),  # faster than the link
        ("hot set above the limit", hot_cold(200 * MIB, 64 * MIB, 512 * MIB, 0.95)),
    ],
)
def test_a_guest_that_never_converges_is_said_so_from_its_third_round_start(name, dirtied) -> None:
    samples, ended = run(dirtied, first_pass_bytes=1024 * MIB)
    assert ended is None, name
    third = next(i for i, o in enumerate(samples) if o.iteration == 4)
    for i in range(third + 1, len(samples) + 1):
        f = forecast(samples[:i])
        assert f is not None and not f.converges and math.isinf(f.remaining_s), (name, i, f)
        assert f.needed_downtime_ms > LIMIT_MS


def test_nothing_is_forecast_during_the_first_pass_or_in_post_copy() -> None:
    first_pass = [Observation(t, 1, 1000 * MIB - int(t * BW), BW, LIMIT_MS) for t in range(5)]
    assert forecast(first_pass) is None
    post = [Observation(0, 2, 100 * MIB, BW, LIMIT_MS), Observation(1, 3, 50 * MIB, BW, LIMIT_MS)]
    post.append(Observation(2, 4, 10 * MIB, BW, LIMIT_MS, postcopy=True))
    assert forecast(post) is None


def test_a_round_start_counts_where_the_samples_pin_it_down() -> None:
    mib = 2**20
    history = [
        Observation(0.0, 1, 900 * mib, BW, LIMIT_MS),  # the first pass
        Observation(0.5, 2, 100 * mib, BW, LIMIT_MS),  # 25 MiB may have gone unseen: kept
        Observation(0.75, 2, 90 * mib, BW, LIMIT_MS),  # the same round
        Observation(1.75, 5, 40 * mib, BW, LIMIT_MS),  # 50 MiB unseen of 40: not pinned down
        Observation(2.0, 6, 80 * mib, BW, LIMIT_MS),
        Observation(2.1, 0, 0, BW, LIMIT_MS),  # a sample that says nothing
    ]
    starts = round_starts(history)
    assert [(s.iteration, s.elapsed_s, s.remaining_bytes) for s in starts] == [
        (2, 0.5, 100 * mib),
        (6, 2.0, 80 * mib),
    ]


@given(
    r0=st.floats(10 * MIB, 4096 * MIB),
    q=st.floats(0.01, 1.5),
    gap=st.integers(1, 4),
)
def test_the_ratio_per_round_is_read_over_gaps_and_decides_convergence(r0, q, gap) -> None:
    r1 = r0 * q**gap
    history = [
        Observation(0.0, 1, int(r0), BW, LIMIT_MS),
        Observation(0.0, 2, int(r0), BW, LIMIT_MS),
        Observation(0.0, 2 + gap, max(1, int(r1)), BW, LIMIT_MS),
    ]
    f = forecast(history)
    if r1 <= BW * LIMIT_MS / 1000:
        assert f is not None and f.converges and f.rounds_left == 0
    elif q >= STUCK_RATIO + 1e-3:
        assert f is None  # two round starts alone never say it stopped
        third = Observation(0.0, 3 + gap, max(1, int(r1 * q)), BW, LIMIT_MS)
        f = forecast([*history, third])
        assert f is not None and not f.converges
    elif q < STUCK_RATIO - 1e-3:
        assert f is not None and f.converges
