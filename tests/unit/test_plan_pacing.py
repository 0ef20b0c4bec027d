"""The plan simulates the escalation ladder at the drain's configured pace."""

from __future__ import annotations

import dataclasses

from hostmaint.coordinator import escalation
from hostmaint.coordinator.model import GIB, MIB, DrainPolicy, Link, Outcome, VmSpec
from hostmaint.coordinator.planner import plan_drain, plan_strategy
from hostmaint.coordinator.simulator import simulate

LINK = Link(10e9 / 8)


def _first_raise_s(history: list[escalation.Observation]) -> float:
    start_ms = history[0].max_downtime_ms
    return next(o.elapsed_s for o in history if o.max_downtime_ms != start_ms)


def test_the_stall_factor_paces_the_plans_ladder_as_it_paces_the_run() -> None:
    """A writer reported at 10 MiB/s rewrites its 8 GiB set at 1.1 times the link: it falls
    behind the plan, and the ladder raises its limit once it takes stall_factor times its
    prediction (plus the grace), or its rounds show it will not converge, whichever comes
    first; in the plan's simulation as in the run (the executor's Limits:
    tests/coordinator/test_ladder_pacing.py)."""
    reported = VmSpec(
        uuid="w",
        name="w",
        memory_bytes=16 * GIB,
        nonzero_bytes=8 * GIB,
        working_set_bytes=8 * GIB,
        dirty_rate_bytes_per_s=10 * MIB,
    )
    truth = dataclasses.replace(
        reported, dirty_rate_bytes_per_s=1.1 * LINK.bandwidth_bytes_per_s * 0.94
    )
    pol = DrainPolicy()
    raised: dict[float, float] = {}
    took: dict[float, float] = {}
    late_s: dict[float, float] = {}
    for factor in (1.5, 3.0):
        pacing = escalation.Pacing(stall_factor=factor)
        plan = plan_drain([reported], [], LINK, pol, pacing=pacing)
        assert plan.pacing == pacing
        (m,) = plan.migrations
        strategy = plan_strategy(plan, [truth], LINK, pol)
        limits = strategy.limits["w"]
        assert (limits.stall_factor, limits.stall_grace_s) == (factor, pacing.stall_grace_s)
        (run,) = simulate([truth], strategy, LINK, policy=pol).vms
        assert run.outcome is Outcome.COMPLETED
        raised[factor] = _first_raise_s(strategy.history["w"])
        took[factor] = run.end_s - run.start_s
        late_s[factor] = m.predicted_total_s * factor + pacing.stall_grace_s
    # 1.5: raised at the first poll past 1.5 times the prediction and the grace (34 s),
    # before its rounds show anything; 3.0: later, when its rounds show it will not
    # converge (37 s), long before its own timeout (56 s)
    assert late_s[1.5] < raised[1.5] <= late_s[1.5] + 2 * escalation.DEFAULT_PACING.poll_interval_s
    assert raised[1.5] < raised[3.0] < late_s[3.0] - 10
    assert took[3.0] > took[1.5]
