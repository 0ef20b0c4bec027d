"""The roll planner: capacity and server groups at every wave, every VM placed, each VM
moved once where capacity allows, waves of at most N, determinism, worked examples."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostmaint.coordinator import rollpredict
from hostmaint.coordinator.model import GIB, DrainPolicy, Link, ServerGroup, TargetHost, VmSpec
from hostmaint.coordinator.planner import plan_drain
from hostmaint.coordinator.roll import NO_HOST_DONE_REASON, naive_roll, plan_roll
from hostmaint.coordinator.rollaudit import replay_roll
from hostmaint.coordinator.rolltypes import (
    DrainEstimate,
    RollHost,
    RollInfeasible,
    RollPlan,
    RollPolicy,
)


def gib_predictor(host: str, moves: Sequence[tuple[VmSpec, str]]) -> DrainEstimate:
    """1 s per GiB sent, and the VMs' memory as the bytes."""
    sent = sum(vm.memory_bytes for vm, _ in moves)
    return DrainEstimate(sent / GIB, float(sent))


def host(name: str, *sizes_gib: int, memory_gib: int = 64, pcpus: int = 64) -> RollHost:
    vms = tuple(
        VmSpec(uuid=f"{name}{i}", name=f"{name}{i}", memory_bytes=s * GIB)
        for i, s in enumerate(sizes_gib)
    )
    return RollHost(name, memory_gib * GIB, pcpus, 1.0, vms)


def check_roll(hosts: Sequence[RollHost], plan: RollPlan, max_per_wave: int) -> None:
    """Replays the plan on its own and asserts every rule of a roll. Hosts are checked at
    the end of each wave: a wave's hosts only send and the others only receive, so that is
    every host's fullest point of the wave."""
    vm_of = {v.uuid: v for h in hosts for v in h.vms}
    where = {v.uuid: h.name for h in hosts for v in h.vms}
    cap = {h.name: (h.memory_capacity_bytes, h.vcpu_capacity) for h in hosts}
    overhead = {h.name: h.memory_overhead_bytes for h in hosts}
    wave_of = {h: w.index for w in plan.waves for h in w.hosts}
    assert sorted(wave_of) == sorted(cap)  # every host drained, once
    assert sum(len(w.hosts) for w in plan.waves) == len(hosts)
    moved: Counter[str] = Counter()
    for w in plan.waves:
        assert 1 <= len(w.hosts) <= max_per_wave
        for d in w.drains:
            for m in d.moves:
                assert m.source == d.host == where[m.vm_uuid]
                assert wave_of[m.target] != w.index  # never onto a host of its own wave
                moved[m.vm_uuid] += 1
                assert m.nth == moved[m.vm_uuid]
                where[m.vm_uuid] = m.target
        assert not [u for u, h in where.items() if h in w.hosts]  # its hosts are empty
        mem, cpu = Counter(overhead), Counter[str]()
        members: dict[tuple[str, str], list[str]] = {}
        for uuid, h in where.items():
            mem[h] += vm_of[uuid].memory_bytes
            cpu[h] += vm_of[uuid].vcpus
            for g in vm_of[uuid].server_groups:
                members.setdefault((g.policy, g.id), []).append(h)
        for h, (cap_mem, cap_cpu) in cap.items():
            assert mem[h] <= cap_mem and cpu[h] <= cap_cpu, f"wave {w.index}: {h} over"
        for (policy, _), hs in members.items():
            if policy == "anti-affinity":
                assert len(set(hs)) == len(hs)
            if policy == "affinity":
                assert len(set(hs)) == 1
    assert dict(plan.placement) == where  # every VM placed, where the moves left it
    assert plan.vm_count == len(vm_of)
    # the parked VMs are exactly the moves onto hosts drained later
    later = {
        (m.vm_uuid, m.wave)
        for m in plan.moves
        if wave_of[m.target] > m.wave  # drained after it arrives: it moves again
    }
    assert {(p.vm_uuid, p.wave) for p in plan.parked} == later
    assert all(p.reason for p in plan.parked)
    assert plan.predicted_s == pytest.approx(sum(w.predicted_s for w in plan.waves))


def make_cloud(
    seed: int,
    n_hosts: int,
    *,
    equal: bool,
    max_fill: float,
    anti_size: int,
    empty_host: bool = False,
) -> list[RollHost]:
    """Hosts of 16 GiB and 8 vCPUs (``equal``) or of mixed sizes, each filled up to
    ``max_fill`` with VMs of 1-8 GiB and 1-4 vCPUs; hard anti-affinity groups of
    ``anti_size`` members on distinct hosts, hard-affinity pairs on one host, soft groups
    anywhere."""
    rng = random.Random(seed)
    shapes = [(16, 4, 2.0)] * n_hosts
    if not equal:
        shapes = [rng.choice([(8, 2, 2.0), (16, 4, 2.0), (32, 4, 4.0)]) for _ in range(n_hosts)]
    vms: list[list[VmSpec]] = []
    for i, (mem_gib, pcpus, ratio) in enumerate(shapes):
        mem, cpu, mine = 0, 0, []
        limit = rng.uniform(max_fill / 2, max_fill)
        for j in range(12):
            size, vcpus = rng.choice([1, 2, 2, 4, 8]), rng.choice([1, 1, 2, 4])
            if mem + size > limit * mem_gib or cpu + vcpus > limit * pcpus * ratio:
                continue
            mem, cpu = mem + size, cpu + vcpus
            mine.append(
                VmSpec(uuid=f"h{i}v{j}", name=f"v{j}", memory_bytes=size * GIB, vcpus=vcpus)
            )
        vms.append([] if empty_host and i == n_hosts - 1 else mine)
    free = [list(range(len(v))) for v in vms]

    def join(h: int, group: ServerGroup) -> None:
        if free[h]:
            j = free[h].pop(rng.randrange(len(free[h])))
            vms[h][j] = dataclasses.replace(vms[h][j], server_groups=(group,))

    for g in range(rng.randrange(0, n_hosts)):
        size = min(anti_size, n_hosts)
        for h in rng.sample(range(n_hosts), size):
            join(h, ServerGroup(f"anti{g}", "anti-affinity"))
    for g in range(rng.randrange(0, 3)):
        h = rng.randrange(n_hosts)
        if len(free[h]) >= 2:
            join(h, ServerGroup(f"aff{g}", "affinity"))
            join(h, ServerGroup(f"aff{g}", "affinity"))
    for g in range(rng.randrange(0, 3)):
        policy = rng.choice(["soft-affinity", "soft-anti-affinity"])
        for h in rng.choices(range(n_hosts), k=3):
            join(h, ServerGroup(f"soft{g}", policy))
    return [
        RollHost(f"host{i:02d}", m * GIB, p, r, tuple(v))
        for i, ((m, p, r), v) in enumerate(zip(shapes, vms, strict=True))
    ]


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 1_000_000),
    n_hosts=st.integers(2, 9),
    per_wave=st.integers(1, 4),
    equal=st.booleans(),
    max_fill=st.floats(0.1, 1.0),
    anti_size=st.integers(2, 4),
)
def test_every_roll_keeps_capacity_groups_and_wave_size(
    seed: int, n_hosts: int, per_wave: int, equal: bool, max_fill: float, anti_size: int
) -> None:
    hosts = make_cloud(seed, n_hosts, equal=equal, max_fill=max_fill, anti_size=anti_size)
    policy = RollPolicy(max_hosts_per_wave=per_wave, maintenance_s=60.0)
    for roll in (
        lambda: plan_roll(hosts, policy, gib_predictor),
        lambda: naive_roll(hosts, gib_predictor),
    ):
        try:
            plan = roll()
        except RollInfeasible as e:  # a rule no order can keep: it names the VM
            assert e.vm_uuid in {v.uuid for h in hosts for v in h.vms}
            continue
        check_roll(hosts, plan, per_wave if plan.strategy == "hostmaint" else 1)
        assert replay_roll(hosts, plan, per_wave).violations == ()


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 1_000_000),
    n_hosts=st.integers(3, 10),
    per_wave=st.integers(1, 4),
    empty_host=st.booleans(),
)
def test_each_vm_moves_once_but_the_first_hosts_when_capacity_allows(
    seed: int, n_hosts: int, per_wave: int, empty_host: bool
) -> None:
    """Hosts of one size, each at most half full: any host's VMs fit on any other host (so
    the free capacity holds an empty host's worth and more), and anti-affinity pairs."""
    hosts = make_cloud(seed, n_hosts, equal=True, max_fill=0.5, anti_size=2, empty_host=empty_host)
    plan = plan_roll(hosts, RollPolicy(max_hosts_per_wave=per_wave), gib_predictor)
    check_roll(hosts, plan, per_wave)
    first = set(plan.waves[0].hosts)
    on_first = {v.uuid for h in hosts if h.name in first for v in h.vms}
    moves = Counter(m.vm_uuid for m in plan.moves)
    for h in hosts:
        for vm in h.vms:
            assert moves[vm.uuid] == (2 if vm.uuid in {p.vm_uuid for p in plan.parked} else 1)
    assert {p.vm_uuid for p in plan.parked} <= on_first
    assert all(p.reason == NO_HOST_DONE_REASON and p.wave == 1 for p in plan.parked)
    if plan.parked:  # no host was empty: the first wave drains the host with the fewest VMs
        assert len(first) == 1
        assert len(on_first) == min(len(h.vms) for h in hosts)
    if empty_host:  # a host empty at the start is done at once: every VM moves once
        assert plan.parked == ()
        assert len(plan.moves) == plan.vm_count


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 1_000_000), n_hosts=st.integers(2, 8), per_wave=st.integers(1, 3))
def test_deterministic_and_independent_of_input_order(
    seed: int, n_hosts: int, per_wave: int
) -> None:
    hosts = make_cloud(seed, n_hosts, equal=False, max_fill=0.6, anti_size=2)
    policy = RollPolicy(max_hosts_per_wave=per_wave)
    try:
        plan = plan_roll(hosts, policy, gib_predictor)
    except RollInfeasible:
        return
    shuffled = [dataclasses.replace(h, vms=h.vms[::-1]) for h in reversed(hosts)]
    assert plan_roll(hosts, policy, gib_predictor) == plan
    assert plan_roll(shuffled, policy, gib_predictor) == plan


EXAMPLE = [host("a", 16, 16, 8), host("b", 32, 8), host("c", 8), host("d", 16, 8), host("e", 8, 8)]


def test_worked_example_of_the_module_docstring() -> None:
    plan = plan_roll(EXAMPLE, RollPolicy(max_hosts_per_wave=2), gib_predictor)
    assert plan.host_order == (("c",), ("e", "d"), ("b", "a"))
    assert [(p.vm_uuid, p.target, p.reason) for p in plan.parked] == [
        ("c0", "a", NO_HOST_DONE_REASON)
    ]
    assert [(m.source, m.target) for m in plan.moves if m.vm_uuid == "c0"] == [
        ("c", "a"),
        ("a", "d"),
    ]
    assert len(plan.moves) == 11 and plan.vm_count == 10
    assert {m.target for m in plan.moves if m.wave == 2} == {"c"}
    assert {m.target for m in plan.moves if m.wave == 3} == {"d", "e"}
    assert [w.predicted_s for w in plan.waves] == [8.0, 24.0, 48.0]
    assert plan.predicted_s == 80.0
    check_roll(EXAMPLE, plan, 2)
    naive = naive_roll(EXAMPLE, gib_predictor)
    assert naive.host_order == (("a",), ("b",), ("c",), ("d",), ("e",))
    assert len(naive.moves) == 14 and naive.predicted_s == 176.0
    assert [(m.source, m.target) for m in naive.moves if m.vm_uuid == "a0"] == [
        ("a", "c"),
        ("c", "b"),
    ]
    check_roll(EXAMPLE, naive, 1)


def test_maintenance_time_is_added_per_wave() -> None:
    plan = plan_roll(EXAMPLE, RollPolicy(max_hosts_per_wave=2, maintenance_s=600.0), gib_predictor)
    assert plan.predicted_s == 80.0 + 3 * 600.0
    assert [w.predicted_drain_s for w in plan.waves] == [8.0, 24.0, 48.0]


def test_an_empty_host_goes_first_and_nothing_moves_twice() -> None:
    hosts = [host("a", 8, 8), host("b", 16), host("spare")]
    plan = plan_roll(hosts, RollPolicy(max_hosts_per_wave=1), gib_predictor)
    assert plan.host_order[0] == ("spare",) and plan.waves[0].predicted_s == 0.0
    assert plan.parked == () and plan.moves_per_vm == 1.0
    check_roll(hosts, plan, 1)


def test_waves_grow_as_done_hosts_free_capacity() -> None:
    """Eight half-full hosts, up to four at once: one host, then as many as the hosts done
    can take (64 GiB free on the first, then more)."""
    hosts = [host(f"h{i}", 8, 8, 8, 8) for i in range(8)]
    plan = plan_roll(hosts, RollPolicy(max_hosts_per_wave=4), gib_predictor)
    assert [len(w.hosts) for w in plan.waves] == [1, 2, 4, 1]
    assert len(plan.parked) == 4 and plan.moves_per_vm == pytest.approx(36 / 32)
    check_roll(hosts, plan, 4)


def test_vcpus_at_the_allocation_ratio_bound_the_targets() -> None:
    def vcpu_host(name: str, n: int) -> RollHost:
        vms = tuple(
            VmSpec(uuid=f"{name}{i}", name=f"{name}{i}", memory_bytes=GIB, vcpus=4)
            for i in range(n)
        )
        return RollHost(name, 64 * GIB, 4, 2.0, vms)  # 8 vCPUs: two VMs

    hosts = [vcpu_host("a", 2), vcpu_host("b", 1), vcpu_host("c", 0)]
    plan = plan_roll(hosts, RollPolicy(max_hosts_per_wave=3), gib_predictor)
    assert plan.host_order == (("c",), ("b",), ("a",))  # b's VM fills c's vCPUs half
    assert plan.vcpu_fill_peak == 1.0
    check_roll(hosts, plan, 3)


def test_memory_the_host_reports_beyond_its_vms_stays() -> None:
    # a reports 12 GiB used for its 4 GiB VM: 8 GiB stay when the VM leaves
    a = dataclasses.replace(host("a", 4, memory_gib=16), memory_used_bytes=12 * GIB)
    b = host("b", 4, memory_gib=16)
    plan = plan_roll([a, b], RollPolicy(), gib_predictor)
    # a's VM waits on b, then b's 8 GiB fill the 8 GiB a has for guests
    assert plan.host_order == (("a",), ("b",))
    assert plan.memory_fill_peak == 1.0
    check_roll([a, b], plan, 1)
    heavier = dataclasses.replace(a, memory_used_bytes=13 * GIB)
    with pytest.raises(RollInfeasible):
        plan_roll([heavier, b], RollPolicy(), gib_predictor)


def test_hard_affinity_groups_move_whole_and_anti_affinity_apart() -> None:
    aff, anti = ServerGroup("db", "affinity"), ServerGroup("web", "anti-affinity")

    def vm(uuid: str, group: ServerGroup) -> VmSpec:
        return VmSpec(uuid=uuid, name=uuid, memory_bytes=4 * GIB, server_groups=(group,))

    hosts = [
        RollHost("a", 64 * GIB, 64, 1.0, (vm("db1", aff), vm("db2", aff), vm("w1", anti))),
        RollHost("b", 64 * GIB, 64, 1.0, (vm("w2", anti),)),
        RollHost("c", 64 * GIB, 64, 1.0, (vm("w3", anti),)),
        RollHost("d", 64 * GIB, 64, 1.0),
    ]
    plan = plan_roll(hosts, RollPolicy(max_hosts_per_wave=2), gib_predictor)
    for w in plan.waves:
        targets = {m.target for m in w.drains[0].moves if m.vm_uuid.startswith("db")}
        assert len(targets) <= 1
    check_roll(hosts, plan, 2)


def test_a_rule_no_order_keeps_is_reported() -> None:
    anti = ServerGroup("web", "anti-affinity")
    hosts = [
        RollHost(n, 64 * GIB, 64, 1.0, (VmSpec(f"w{n}", f"w{n}", GIB, server_groups=(anti,)),))
        for n in ("a", "b")
    ]
    with pytest.raises(RollInfeasible) as err:
        plan_roll(hosts, RollPolicy(), gib_predictor)
    assert err.value.vm_uuid == "wa" and "anti-affinity" in err.value.reason


@pytest.mark.parametrize(
    ("hosts", "message"),
    [
        ([host("a", 8), host("a", 8)], "names repeat"),
        ([host("a", 80)], "over its capacity"),
        (
            [
                RollHost(n, GIB * 8, 8, 1.0, (VmSpec(n, n, GIB, server_groups=(g,)),))
                for n, g in (
                    ("a", ServerGroup("g", "affinity")),
                    ("b", ServerGroup("g", "affinity")),
                )
            ],
            "split",
        ),
        (
            [
                RollHost(
                    "a",
                    GIB * 8,
                    8,
                    1.0,
                    (VmSpec("x", "x", GIB, server_groups=(ServerGroup("g", "spread"),)),),
                )
            ],
            "unknown policy",
        ),
    ],
)
def test_inputs_that_break_a_rule_already_are_refused(hosts: list[RollHost], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_roll(hosts, RollPolicy(), gib_predictor)


def test_at_least_one_host_per_wave() -> None:
    with pytest.raises(ValueError):
        plan_roll(EXAMPLE, RollPolicy(max_hosts_per_wave=0), gib_predictor)


LINK = Link(10e9 / 8)
POLICY = DrainPolicy(allow_postcopy=True)


def test_planned_predictor_is_the_drain_planners_plan_with_the_rolls_targets() -> None:
    vms = [
        VmSpec(uuid=f"v{i}", name=f"v{i}", memory_bytes=4 * GIB, nonzero_bytes=GIB * (i + 1))
        for i in range(5)
    ]
    moves = [(vm, "t1" if i % 2 else "t2") for i, vm in enumerate(vms)]
    estimate = rollpredict.planned(LINK, POLICY)("src", moves)
    pinned = [
        TargetHost("t1", 1 << 62, 1 << 62, cpu_compatible=frozenset({"v1", "v3"})),
        TargetHost("t2", 1 << 62, 1 << 62, cpu_compatible=frozenset({"v0", "v2", "v4"})),
    ]
    plan = plan_drain(vms, pinned, LINK, POLICY)
    assert {m.vm_uuid: m.target for m in plan.migrations} == {v.uuid: t for v, t in moves}
    assert estimate.time_s == plan.predicted_makespan_s
    assert estimate.bytes_sent >= sum(v.sent_bytes for v in vms)


def test_queued_predictor_sends_every_page_and_respects_its_slots() -> None:
    vms = [
        VmSpec(uuid=f"v{i}", name=f"v{i}", memory_bytes=4 * GIB, nonzero_bytes=2 * GIB)
        for i in range(8)
    ]
    predict = rollpredict.queued(LINK, POLICY)
    one_target = predict("src", [(vm, "t1") for vm in vms])
    spread = predict("src", [(vm, f"t{i}") for i, vm in enumerate(vms)])
    assert one_target.bytes_sent >= sum(v.sent_bytes for v in vms)
    # two at a time on one target, four at a time spread out: the link is the limit either
    # way for idle VMs, but set-ups overlap more when spread
    assert spread.time_s <= one_target.time_s
    assert predict("src", []).time_s == 0.0
