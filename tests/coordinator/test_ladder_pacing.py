"""The run follows each migration with the very ladder the plan simulated for it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hostmaint.coordinator import escalation as esc
from hostmaint.coordinator.executor import ExecutorSettings
from hostmaint.coordinator.gather import capabilities_of
from hostmaint.coordinator.journal import VmRow
from hostmaint.coordinator.model import DrainPolicy, Link
from hostmaint.coordinator.planner import plan_strategy
from hostmaint.protos import coordinator_pb2 as cpb
from tests.coordinator.stuckagent import (
    CANNOT_THROTTLE,
    LINK_BYTES_PER_S,
    MIB,
    VM,
    Agent,
    Clock,
    executor,
)


def test_the_runs_limits_are_the_plans_at_the_configured_pace(tmp_path: Path) -> None:
    """The default pace, then stall_factor 3 (and a grace, a settle time and a poll of
    their own): the plan simulates the ladder at that pace, and the executor follows the
    migration with the very Limits the plan's simulation used (the source's capabilities
    included)."""
    paces = ((1.5, 10.0, 8.0, 1.0), (3.0, 5.0, 4.0, 0.5))
    for factor, grace_s, settle_s, poll_s in paces:
        agent = Agent(Clock(), CANNOT_THROTTLE, rate_bytes_per_s=100 * MIB)
        settings = ExecutorSettings(
            defaults=DrainPolicy(),
            link_bandwidth_bytes_per_s=LINK_BYTES_PER_S,
            stall_factor=factor,
            stall_grace_s=grace_s,
            escalation_settle_s=settle_s,
            poll_interval_s=poll_s,
        )
        ex = executor(tmp_path / str(factor), agent, settings)
        policy_pb = cpb.DrainPolicy()
        _, plan, inputs = ex.plan("src", policy_pb)
        assert plan.pacing == esc.Pacing(
            stall_factor=factor, stall_grace_s=grace_s, settle_s=settle_s, poll_interval_s=poll_s
        )
        assert plan.source == capabilities_of(agent.report()) == inputs.source
        run = ex.runtime.new_run("d", "src", policy_pb)
        run.remember(plan, inputs)
        (m,) = plan.migrations
        row = VmRow(
            "d", VM, m.vm_name, 0, "migrating", "src", predicted_total_s=m.predicted_total_s
        )
        simulated = plan_strategy(plan, list(inputs.vms), Link(LINK_BYTES_PER_S), run.policy)
        limits = run.limits(row, ex.settings.pacing)
        assert limits == simulated.limits[VM]
        assert (limits.stall_factor, limits.stall_grace_s, limits.settle_s) == (
            factor,
            grace_s,
            settle_s,
        )
        assert simulated.poll_s == poll_s
        # a writer the ladder would throttle, on a source that cannot
        assert VM in run.cpu_bound and not limits.cpu_bound


def test_a_migration_switched_to_post_copy_no_longer_needs_its_share(
    tmp_path: Path,
) -> None:
    """Dispatch counts a running migration's need only while it pre-copies, in the run as
    in the plan's simulation (a simulated migration in post-copy is not in pre-copy)."""
    agent = Agent(Clock(), CANNOT_THROTTLE, rate_bytes_per_s=100 * MIB)
    settings = ExecutorSettings(defaults=DrainPolicy(), link_bandwidth_bytes_per_s=LINK_BYTES_PER_S)
    ex = executor(tmp_path, agent, settings)
    policy_pb = cpb.DrainPolicy()
    _, plan, inputs = ex.plan("src", policy_pb)
    run = ex.runtime.new_run("d", "src", policy_pb)
    run.remember(plan, inputs)
    (m,) = plan.migrations
    row = VmRow("d", VM, m.vm_name, 0, "migrating", "src")
    assert run.slot(row).in_precopy and run.slot(row).need_bytes_per_s == m.need_bytes_per_s
    raised = dataclasses.replace(row, tuning_applied=(f"{esc.Action.RAISE_DOWNTIME}=900",))
    assert run.slot(raised).in_precopy
    switched = dataclasses.replace(raised, tuning_applied=(*raised.tuning_applied, "postcopy"))
    assert not run.slot(switched).in_precopy
    # switched by another hand (Nova's monitor): the watch saw it in post-copy
    run.in_postcopy.add(VM)
    assert not run.slot(row).in_precopy
