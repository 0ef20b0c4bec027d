"""Lower bounds on a drain's makespan: hand-computed parts, and no drain within the policy
beats them."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from hostmaint.coordinator import baselines
from hostmaint.coordinator.bounds import lower_bound, vm_floor
from hostmaint.coordinator.model import (
    DEFAULT_PARAMS as P,
)
from hostmaint.coordinator.model import (
    GIB,
    MIB,
    DrainPolicy,
    Link,
    VmSpec,
    WriterKind,
    first_round_bytes,
)
from hostmaint.coordinator.planner import plan_drain, plan_strategy
from hostmaint.coordinator.scenarios import make_scenario
from hostmaint.coordinator.simulator import SETUP_JITTER, simulate

LINK = Link(10e9 / 8)
BW = LINK.bandwidth_bytes_per_s * P.link_efficiency
POLICY = DrainPolicy(max_downtime_ms=500.0, max_parallel_per_source=2)


def idle_vm(i: int, gib: int = 4) -> VmSpec:
    return VmSpec(f"v{i}", f"v{i}", gib * GIB, nonzero_bytes=gib * GIB // 4)


def test_an_idle_vm_sends_its_pages_once_and_takes_its_fixed_costs() -> None:
    vm = idle_vm(0)
    zero = 3 * GIB
    first = GIB + zero * P.zero_page_cost_fraction
    assert first_round_bytes(vm) == first
    floor = vm_floor(vm, LINK, POLICY)
    # no writes: what it sends is its first copy and the device state at switch-over
    assert math.isclose(floor.bytes_sent, first + P.device_state_bytes, rel_tol=1e-9)
    by_hand = (
        P.setup_s * (1 - SETUP_JITTER)  # the shortest set-up
        + first / BW  # the copy
        + zero / P.zero_scan_bytes_per_s  # QEMU's scan of the zero pages
        + P.device_state_bytes / BW  # switch-over: the device state ...
        + P.switchover_ms / 1000  # ... and the fixed cost
        + P.finish_s
    )
    assert math.isclose(floor.run_s, by_hand, rel_tol=1e-6)


def test_a_dirty_vm_must_send_more_than_its_pages_once() -> None:
    hot = VmSpec(
        "h",
        "h",
        8 * GIB,
        nonzero_bytes=4 * GIB,
        working_set_bytes=2 * GIB,
        dirty_rate_bytes_per_s=400 * MIB,
        writer=WriterKind.PACED,
    )
    floor = vm_floor(hot, LINK, POLICY)
    assert floor.bytes_sent > 1.2 * floor.first_copy_bytes


def test_the_bound_is_the_largest_of_its_parts() -> None:
    vms = [idle_vm(i, gib) for i, gib in enumerate((64, 2, 2, 2))]
    b = lower_bound(vms, LINK, POLICY)
    floors = [vm_floor(v, LINK, POLICY) for v in vms]
    assert math.isclose(b.first_copy_s, sum(f.first_copy_bytes for f in floors) / BW)
    assert math.isclose(b.slots_s, sum(f.run_s for f in floors) / 2)  # two slots
    assert b.longest_s == floors[0].run_s  # the 64 GiB VM scans 48 GiB of zero pages
    assert b.bound_s == max(b.first_copy_s, b.bytes_s, b.slots_s, b.longest_s) == b.longest_s
    assert lower_bound([], LINK, POLICY).bound_s == 0.0


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 10),
    gbit=st.sampled_from([1.0, 10.0, 25.0]),
    mix=st.sampled_from(["idle", "mixed", "heavy"]),
)
def test_no_drain_within_the_policy_beats_the_bound(
    seed: int, n: int, gbit: float, mix: str
) -> None:
    sc = make_scenario("b", seed, n, gbit, mix)
    plan = plan_drain(sc.reported, sc.targets, sc.link, sc.policy)
    assert plan.predicted_makespan_s >= plan.lower_bound_s - 1e-6
    moving = {m.vm_uuid for m in plan.migrations}
    truth = [v for v in sc.truth if v.uuid in moving]
    bound = lower_bound(truth, sc.link, sc.policy).bound_s
    runs = [
        simulate(truth, plan_strategy(plan, truth, sc.link, sc.policy), sc.link, seed=seed),
        simulate(truth, baselines.kubevirt_default(truth), sc.link, seed=seed),
        simulate(truth, baselines.nova_default(truth), sc.link, seed=seed),
    ]
    for res in runs:
        if res.failed == 0 and res.over_downtime == 0:
            assert res.makespan_s >= bound * (1 - 1e-9), res.strategy
