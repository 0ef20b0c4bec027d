"""The run takes no tuning the source host cannot do (tests/coordinator/stuckagent.py:
a source agent whose migration never progresses, and the simulated cloud)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hostmaint.coordinator import escalation as esc
from hostmaint.coordinator.cliview import render_plan
from hostmaint.coordinator.executor import Executor
from hostmaint.coordinator.gather import capabilities_of
from hostmaint.coordinator.model import FULLY_CAPABLE, HostCapabilities, Settings
from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import coordinator_pb2 as cpb
from tests.coordinator.conftest import Cluster
from tests.coordinator.stuckagent import (
    CAN_ALL,
    CANNOT_THROTTLE,
    MIB,
    NO_CPU_CONTROLLER,
    VM,
    Agent,
    Clock,
    executor,
)


def drain(ex: Executor) -> tuple[str, ...]:
    """Drains the source; the tuning the run applied to its VM."""
    drain_id = ex.start_drain("src", cpb.DrainPolicy(), "test")
    assert ex.wait(drain_id, 60.0)
    assert ex.journal.drain(drain_id).state == "incomplete"  # the ladder's last step: abort
    return ex.journal.vm(drain_id, VM).tuning_applied


def test_the_run_never_throttles_on_a_source_without_the_cpu_controller(tmp_path: Path) -> None:
    """The same stuck migration, once on a source that can throttle (the ladder's three
    steps, lifted at the end) and once on one that cannot: raise, then the next step."""
    able = Agent(Clock(), CAN_ALL)
    applied = drain(executor(tmp_path / "a", able))
    assert [a.split("=")[0] for a in applied] == [
        "raise_downtime",
        "throttle_vcpus",
        "throttle_vcpus",
        "throttle_vcpus",
        "abort",
    ]
    throttles = [t.vcpu_throttle_pct for t in able.tunes if t.HasField("vcpu_throttle_pct")]
    assert throttles == [40, 70, 90, 0]

    unable = Agent(Clock(), CANNOT_THROTTLE)
    applied = drain(executor(tmp_path / "b", unable))
    assert [a.split("=")[0] for a in applied] == ["raise_downtime", "abort"]
    assert not any(t.HasField("vcpu_throttle_pct") for t in unable.tunes)


def test_the_ladder_leaves_out_what_the_source_cannot() -> None:
    """Stuck, CPU-bound, post-copy allowed and permitted: raise, then throttle where the
    source can; where it cannot, straight on to post-copy; without userfaultfd, abort."""
    stuck = [esc.Observation(2.0 * i, i + 1, 500 * MIB, 50e6, 300) for i in range(20)]

    def ladder(source: HostCapabilities) -> list[esc.Action]:
        limits = esc.limits_for(
            predicted_total_s=20.0,
            operator_cap_ms=1000.0,
            link_bytes_per_s=100e6,
            settings=Settings(300.0, postcopy_permitted=True),
            allow_postcopy=True,
            cpu_bound=True,
            source=source,
            pacing=esc.DEFAULT_PACING,
        )
        done, actions = esc.Escalation(), []
        for at_s in (40.0, 50.0, 60.0, 70.0, 80.0):  # a step every 10 s, past the settling
            shift = at_s - stuck[-1].elapsed_s
            history = [dataclasses.replace(o, elapsed_s=o.elapsed_s + shift) for o in stuck]
            decision = esc.next_step(history, limits, done)
            actions.append(decision.action)
            done = esc.applied(done, decision, at_s)
        return actions

    a = esc.Action
    throttle = [a.THROTTLE_VCPUS] * 3
    assert ladder(FULLY_CAPABLE) == [a.RAISE_DOWNTIME, *throttle, a.POSTCOPY]
    no_throttle = HostCapabilities(vcpu_throttle=False, vcpu_throttle_reason=NO_CPU_CONTROLLER)
    assert ladder(no_throttle) == [a.RAISE_DOWNTIME, a.POSTCOPY, a.NONE, a.NONE, a.NONE]
    neither = HostCapabilities(vcpu_throttle=False, postcopy=False)
    assert ladder(neither) == [a.RAISE_DOWNTIME, a.ABORT, a.NONE, a.NONE, a.NONE]


def test_an_agent_that_does_not_report_leaves_every_action_possible() -> None:
    assert capabilities_of(None) == FULLY_CAPABLE
    assert capabilities_of(apb.HostReport(hostname="old")) == FULLY_CAPABLE
    partial = apb.HostReport(
        capabilities=apb.TuningCapabilities(vcpu_throttle=CANNOT_THROTTLE.vcpu_throttle)
    )
    assert capabilities_of(partial) == HostCapabilities(
        vcpu_throttle=False, vcpu_throttle_reason=NO_CPU_CONTROLLER
    )


def test_plan_drain_notes_the_throttle_test_driver_hosts_cannot_do(cluster: Cluster) -> None:
    """Real agents on test:///: GetHost says its domains have no vcpu_quota; the plan
    leaves vCPU throttling out of the ladder and says why; `hostmaint plan` prints it."""
    plan = cluster.stub.PlanDrain(cpb.PlanDrainRequest(host="host1"), timeout=30)
    note, rates = plan.notes  # and where the dirty rates came from
    assert rates.startswith("measured the dirty rates of")
    assert plan.dirty_rates.measured_vms > 0 and plan.dirty_rates.background_vms == 0
    assert f"in {plan.dirty_rates.measuring_s:.1f}s" in rates
    assert note.startswith(
        "vCPU throttling left out of the escalation ladder: the source host cannot do it "
        "(no vcpu_period or vcpu_quota among libvirt's fair scheduler parameters (weight)"
    )
    assert f"note: {note}" in render_plan(plan).splitlines()
