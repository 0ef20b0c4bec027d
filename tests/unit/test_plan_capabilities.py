"""The plan takes no tuning a host cannot do, and simulates the ladder at the drain's pace."""

from __future__ import annotations

import dataclasses

from hostmaint.coordinator.model import (
    FULLY_CAPABLE,
    GIB,
    MIB,
    DrainPolicy,
    HostCapabilities,
    Link,
    Outcome,
    TargetHost,
    Tuning,
    VmSpec,
    WriterKind,
)
from hostmaint.coordinator.planner import plan_drain, plan_strategy
from hostmaint.coordinator.simulator import simulate
from tests.unit.test_planner import found_800_mib_set

LINK = Link(10e9 / 8)
NO_UFFD = "vm.unprivileged_userfaultfd is 0 and QEMU runs unprivileged (uid 64055)"
NO_CPU_CONTROLLER = "libvirt refuses them: cgroup CPU controller is not mounted"
WITHOUT_POSTCOPY = HostCapabilities(postcopy=False, postcopy_reason=NO_UFFD)
WITHOUT_THROTTLE = HostCapabilities(vcpu_throttle=False, vcpu_throttle_reason=NO_CPU_CONTROLLER)


def hot(uuid: str = "hot") -> VmSpec:
    """A paced writer faster than the link: only post-copy moves it."""
    return VmSpec(
        uuid=uuid,
        name=uuid,
        memory_bytes=4 * GIB,
        dirty_rate_bytes_per_s=3 * GIB,
        writer=WriterKind.PACED,
    )


def idle(uuid: str) -> VmSpec:
    return VmSpec(uuid=uuid, name=uuid, memory_bytes=4 * GIB, nonzero_bytes=GIB)


def test_a_source_without_userfaultfd_gets_no_postcopy_even_where_the_policy_allows_it() -> None:
    pol = DrainPolicy(allow_postcopy=True)
    (planned,) = plan_drain([found_800_mib_set()], [], LINK, pol).migrations
    assert planned.tuning is Tuning.POSTCOPY  # where the source can

    plan = plan_drain([found_800_mib_set(), hot()], [], LINK, pol, source=WITHOUT_POSTCOPY)
    (m,) = plan.migrations
    assert m.tuning is not Tuning.POSTCOPY
    assert not m.settings.postcopy_permitted and not m.settings.postcopy_after_first_round
    (stays,) = plan.unmovable
    assert stays.vm_uuid == "hot"
    assert stays.reason == (
        f"cannot converge without post-copy, which the source host cannot do ({NO_UFFD}): "
        "skip or stop the VM's workload"
    )
    assert plan.notes == (f"post-copy left out: the source host cannot do it ({NO_UFFD})",)
    # its ladder does not switch either, however fast the writer turns out to be
    truth = dataclasses.replace(
        found_800_mib_set(), dirty_rate_bytes_per_s=8 * GIB, dirty_rate_floor_bytes_per_s=None
    )
    strategy = plan_strategy(plan, [truth], LINK, pol, reported=[found_800_mib_set()])
    assert not strategy.limits["v0"].allow_postcopy
    assert simulate([truth], strategy, LINK, policy=pol).postcopy_count == 0


def test_a_target_without_userfaultfd_receives_no_postcopy() -> None:
    """The VM only post-copy moves goes where post-copy works; the one sent to the target
    without it is planned by pre-copy, with post-copy not even permitted."""
    pol = DrainPolicy(allow_postcopy=True, max_parallel_per_target=4)
    able = TargetHost("able", 16 * GIB, 64)
    unable = TargetHost("unable", 64 * GIB, 64, capabilities=WITHOUT_POSTCOPY)
    plan = plan_drain([hot(), found_800_mib_set()], [able, unable], LINK, pol)
    placed = {m.vm_uuid: m for m in plan.migrations}
    assert placed["hot"].target == "able" and placed["hot"].tuning is Tuning.POSTCOPY
    assert placed["v0"].target == "unable"  # the most free memory
    assert placed["v0"].tuning is not Tuning.POSTCOPY
    assert not placed["v0"].settings.postcopy_permitted
    assert plan.notes == (
        f"post-copy left out for the 1 VM going to unable: it cannot do it ({NO_UFFD})",
    )

    plan = plan_drain([hot()], [unable], LINK, pol)
    assert not plan.migrations
    (stays,) = plan.unmovable
    assert f"unable: no post-copy ({NO_UFFD})" in stays.reason


def test_a_source_without_the_cpu_controller_gets_no_throttle_from_the_plans_ladder() -> None:
    """The writer of test_planner's floor test, truly at 4 GiB/s: the ladder throttles it
    where the source can; where it cannot, the ladder goes on to its next step (abort:
    no post-copy), and the plan says why throttling was left out."""
    reported = found_800_mib_set()
    truth = dataclasses.replace(
        reported, dirty_rate_bytes_per_s=4 * GIB, dirty_rate_floor_bytes_per_s=None
    )
    pol = DrainPolicy()
    outcomes = {}
    for source in (FULLY_CAPABLE, WITHOUT_THROTTLE):
        plan = plan_drain([reported], [], LINK, pol, source=source)
        strategy = plan_strategy(plan, [truth], LINK, pol, reported=[reported])
        (run,) = simulate([truth], strategy, LINK, policy=pol).vms
        outcomes[source.vcpu_throttle] = (run, strategy.done["v0"], plan.notes)
    run, done, notes = outcomes[True]
    assert run.outcome is Outcome.COMPLETED and done.throttle_pct > 0 and notes == ()
    run, done, notes = outcomes[False]
    assert done.throttle_pct == 0 and run.final_throttle_pct == 0
    assert done.downtime_raised and done.aborted and run.outcome is Outcome.ABORTED
    assert notes == (
        "vCPU throttling left out of the escalation ladder: the source host cannot do it "
        f"({NO_CPU_CONTROLLER})",
    )


def test_no_note_where_the_ladder_would_not_throttle_anyway() -> None:
    """Paced writers are not throttled, nor is anything where auto-converge is forbidden."""
    paced = dataclasses.replace(idle("p"), dirty_rate_bytes_per_s=10 * MIB, writer=WriterKind.PACED)
    assert plan_drain([paced], [], LINK, DrainPolicy(), source=WITHOUT_THROTTLE).notes == ()
    forbidden = DrainPolicy(allow_auto_converge=False)
    assert plan_drain([idle("i")], [], LINK, forbidden, source=WITHOUT_THROTTLE).notes == ()
    assert plan_drain([idle("i")], [], LINK, DrainPolicy(), source=WITHOUT_THROTTLE).notes
