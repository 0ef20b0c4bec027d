"""The drain simulator: shared bandwidth, conservation, determinism, baselines."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from hostmaint.coordinator import baselines
from hostmaint.coordinator.convergence import Migration
from hostmaint.coordinator.model import MIB, Link, Outcome, Settings, VmSpec, WriterKind
from hostmaint.coordinator.scenarios import make_scenario
from hostmaint.coordinator.simulator import Job, share_bandwidth, simulate

LAB_LINK = Link(400e6 / 8)


def lab_vm(i: int) -> VmSpec:
    return VmSpec(
        uuid=f"v{i}",
        name=f"v{i}",
        memory_bytes=256 * MIB,
        working_set_bytes=192 * MIB,
        dirty_rate_bytes_per_s=40 * MIB,
        writer=WriterKind.PACED,
    )


def test_share_bandwidth_is_max_min_fair() -> None:
    assert share_bandwidth(100.0, [10.0, 100.0, 100.0]) == [10.0, 45.0, 45.0]
    assert share_bandwidth(100.0, []) == []


def test_lab_pair_one_after_the_other_beats_both_at_once() -> None:
    vms = [lab_vm(0), lab_vm(1)]
    serial = simulate(vms, baselines.KubeVirtStrategy(vms, max_parallel=1), LAB_LINK)
    together = simulate(vms, baselines.KubeVirtStrategy(vms, max_parallel=2), LAB_LINK)
    assert all(v.outcome is Outcome.COMPLETED for v in serial.vms)
    assert all(v.outcome is Outcome.ABORTED for v in together.vms)  # no progress for 150 s
    assert serial.makespan_s < 90.0


def test_deterministic_for_a_seed() -> None:
    sc = make_scenario("t", 3, 12, 10.0, "mixed")
    a = simulate(sc.truth, baselines.kubevirt_default(sc.truth), sc.link, seed=5)
    b = simulate(sc.truth, baselines.kubevirt_default(sc.truth), sc.link, seed=5)
    assert a == b


def test_nova_default_aborts_at_its_completion_timeout() -> None:
    hot = dataclasses.replace(lab_vm(0), dirty_rate_bytes_per_s=80 * MIB)
    res = simulate([hot], baselines.nova_default([hot]), LAB_LINK)
    (r,) = res.vms
    assert r.outcome is Outcome.ABORTED
    assert abs(r.end_s - r.start_s - 800.0 * 2) < 1e-6  # 800 s per GiB, at least 2 GiB


def test_hardened_nova_switches_stalled_migration_to_postcopy() -> None:
    hot = dataclasses.replace(lab_vm(0), dirty_rate_bytes_per_s=80 * MIB)
    res = simulate([hot], baselines.nova_hardened([hot]), LAB_LINK)
    (r,) = res.vms
    assert r.outcome is Outcome.COMPLETED and r.postcopy
    assert r.start_s + 30.0 <= r.end_s  # 15 s per GiB, at least 2 GiB


def test_every_stalled_migration_of_a_queue_times_out() -> None:
    """Each VM's timeout is its own: none is inherited from an earlier migration (timers were
    keyed by id(), which a later migration can reuse: the baselines' results then varied
    from one process to the next)."""
    hot = [dataclasses.replace(lab_vm(i), dirty_rate_bytes_per_s=80 * MIB) for i in range(4)]
    aborted = simulate(hot, baselines.nova_default(hot), LAB_LINK)
    assert [r.outcome for r in aborted.vms] == [Outcome.ABORTED] * 4
    assert all(abs(r.end_s - r.start_s - 1600.0) < 1e-6 for r in aborted.vms)
    forced = simulate(hot, baselines.nova_hardened(hot), LAB_LINK)
    assert [(r.outcome, r.postcopy) for r in forced.vms] == [(Outcome.COMPLETED, True)] * 4


def test_nova_downtime_steps() -> None:
    steps = baselines.downtime_steps(baselines.NovaConf(), 3.0)
    assert steps[0] == (0.0, 50.0)
    assert steps[-1] == (2250.0, 500.0)
    assert len(steps) == 11


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 12), par=st.integers(1, 6))
def test_simulator_conserves_bytes(seed: int, n: int, par: int) -> None:
    sc = make_scenario("p", seed, n, 10.0, "mixed")
    strat = baselines.KubeVirtStrategy(sc.truth, max_parallel=par)
    res = simulate(sc.truth, strat, sc.link, seed=seed)
    sent = sum(v.bytes_sent for v in res.vms)
    assert abs(res.link_bytes - sent) <= 1e-6 * max(1.0, sent)
    assert res.link_bytes <= sc.link.bandwidth_bytes_per_s * res.makespan_s * (1 + 1e-9)
    assert len(res.vms) + len(res.never_started) == n
    for v, spec in ((v, {s.uuid: s for s in sc.truth}[v.uuid]) for v in res.vms):
        if v.outcome is Outcome.COMPLETED:
            assert v.bytes_sent >= spec.sent_bytes


class _Stubborn:
    """A strategy whose watchdog fires at the same instant for ever and never acts."""

    name = "stubborn"

    def __init__(self, vms: list[VmSpec]) -> None:
        self.queue = list(vms)

    def remaining(self) -> int:
        return len(self.queue)

    def next_jobs(self, now_s: float, running: object) -> list[Job]:
        jobs = [Job(v, Settings(300.0)) for v in self.queue]
        self.queue = []
        return jobs

    def next_control_s(self, mig: Migration) -> float:
        return 1.0

    def control(self, mig: Migration, now_s: float) -> None:
        return None


def test_a_stuck_strategy_hits_the_step_cap_and_fails_the_drain() -> None:
    vms = [lab_vm(0)]
    res = simulate(vms, _Stubborn(vms), LAB_LINK, max_events=500)
    assert res.event_cap_hit
    assert res.failed == 1
    assert all(v.outcome is Outcome.ABORTED for v in res.vms)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 12),
    gbit=st.sampled_from([1.0, 10.0, 25.0]),
    mix=st.sampled_from(["idle", "mixed", "heavy"]),
    parallel=st.integers(1, 6),
)
def test_random_drains_terminate(seed: int, n: int, gbit: float, mix: str, parallel: int) -> None:
    sc = make_scenario("t", seed, n, gbit, mix)
    truth = list(sc.truth)
    strategies = [
        baselines.kubevirt_default(truth),
        baselines.KubeVirtStrategy(truth, max_parallel=parallel),
        baselines.nova_hardened(truth),
    ]
    for strat in strategies:
        res = simulate(truth, strat, sc.link, seed=seed, max_events=20_000)
        # it ends: every VM has a result, and a stuck run says so and counts as failed
        assert len(res.vms) + len(res.never_started) == len(truth)
        assert not res.event_cap_hit or res.failed > 0
        assert all(v.outcome is not Outcome.RUNNING for v in res.vms)
