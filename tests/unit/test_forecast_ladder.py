"""The ladder acts on a migration's own rounds: one that will not converge is rescued as
soon as they show it, not after the stall timeout."""

from __future__ import annotations

from hostmaint.coordinator import escalation as esc

MIB = 2**20
BW = 50 * MIB
LIMITS = esc.Limits(
    predicted_total_s=20.0,
    qemu_downtime_cap_ms=800,
    allow_postcopy=True,
    postcopy_permitted=True,
    cpu_bound=False,
)


def _rounds(remaining_mib: list[float]) -> list[esc.Observation]:
    """A first pass of 500 MiB, then one round per value, sent at BW without a break and
    sampled every second, with what QEMU reports sent."""
    sizes = [500.0 * MIB, *(m * MIB for m in remaining_mib)]
    ends = [sum(sizes[: i + 1]) / BW for i in range(len(sizes))]
    history = []
    t = 0.0
    while t < ends[-1]:
        i = next(k for k, end in enumerate(ends) if t < end)
        left = (ends[i] - t) * BW
        history.append(
            esc.Observation(
                t, 1 + i, int(left), BW, 300, first_pass_done=i >= 1, processed_bytes=int(t * BW)
            )
        )
        t += 1.0
    return history


def test_rounds_that_stop_shrinking_raise_the_limit_before_the_stall_timeout() -> None:
    history = _rounds([200, 195, 198])  # a hot set of ~200 MiB: needs ~4 s of downtime
    now = history[-1]
    assert now.elapsed_s < LIMITS.predicted_total_s * LIMITS.stall_factor + LIMITS.stall_grace_s
    decision = esc.next_step(history, LIMITS, esc.Escalation())
    assert decision.action is esc.Action.RAISE_DOWNTIME
    assert "stop shrinking" in decision.reason


def test_rounds_that_shrink_are_left_alone_until_the_timeout() -> None:
    history = _rounds([200, 120, 70])
    assert esc.behind(history, LIMITS) == ""
    assert esc.next_step(history, LIMITS, esc.Escalation()).action is esc.Action.NONE


def test_two_round_starts_alone_never_say_it_stopped() -> None:
    assert esc.behind(_rounds([200, 199]), LIMITS) == ""


def test_a_planned_post_copy_switches_before_its_rounds_are_spent_when_they_stop_shrinking() -> (
    None
):
    planned = esc.Limits(
        predicted_total_s=20.0,
        qemu_downtime_cap_ms=800,
        allow_postcopy=True,
        postcopy_permitted=True,
        cpu_bound=False,
        postcopy_after_first_pass=True,
        precopy_tries=4,
    )
    shrinking = _rounds([200, 120, 70])
    assert esc.next_step(shrinking, planned, esc.Escalation()).action is esc.Action.NONE
    stuck = _rounds([200, 195, 198])
    decision = esc.next_step(stuck, planned, esc.Escalation())
    assert decision.action is esc.Action.POSTCOPY
    assert decision.reason.startswith("planned: post-copy, before its 4 pre-copy rounds")
