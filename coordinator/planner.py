"""Drain planner: targets, order, concurrency and tuning for every VM of a host (pure).

Public API
----------
``plan_drain(vms, targets, link, policy, params=DEFAULT_PARAMS) -> DrainPlan``
    ``vms`` as the agents report them; ``targets`` the candidate hosts (empty: let Nova's
    scheduler choose every target). Every VM ends up exactly once in
    ``DrainPlan.migrations`` or ``DrainPlan.unmovable`` (with the reason); target capacity
    (memory, vCPUs), CPU compatibility, health and (anti-)affinity are never violated;
    the schedule respects ``max_parallel_per_source`` / ``_per_target``.
``PlannedMigration``: VM, target (None: the scheduler chooses), position, start time,
    predicted time and downtime, tuning and the QEMU ``Settings`` to start it with.
``Unmovable``: VM and reason. ``DrainPlan``: migrations, unmovable, predicted makespan,
    lower bound (``bounds.lower_bound`` of the VMs it moves: what no drain within the
    policy beats; ``bound`` holds its parts), chosen concurrency.
``PlanStrategy``: the schedule as a simulator strategy (used to plan, and by the
    benchmark to run the plan against the true VMs).

How the schedule is chosen: each VM needs a minimum bandwidth to converge with its
tuning (found by bisection on the model); a VM starts when a slot is free and the needs
of the pre-copying migrations plus its own fit the link, so sharing never stops a
dirty VM from converging. Several orders and concurrency caps are simulated with the
reported VMs and the shortest makespan wins: two dirty VMs at half bandwidth each
resend more dirty pages (or never converge) than one after the other, while idle VMs
gain from overlapping their fixed set-up costs and per-stream bandwidth caps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from hostmaint.coordinator.bounds import LowerBound, lower_bound
from hostmaint.coordinator.dispatch import Slot, ready_to_start
from hostmaint.coordinator.model import (
    DEFAULT_PARAMS,
    MIB,
    DrainPolicy,
    Link,
    Migration,
    ModelParams,
    Outcome,
    Prediction,
    Settings,
    TargetHost,
    Tuning,
    VmSpec,
    WriterKind,
    effective_bandwidth,
    predict_at,
    qemu_downtime_limit_ms,
    run_alone,
)
from hostmaint.coordinator.simulator import Job, SimResult, simulate

CANNOT_CONVERGE_REASON = "cannot converge: skip or stop the VM's workload"


@dataclass(frozen=True)
class PlannedMigration:
    vm_uuid: str
    vm_name: str
    target: str | None
    position: int
    start_s: float
    predicted_total_s: float
    predicted_downtime_ms: float
    tuning: Tuning
    settings: Settings
    need_bytes_per_s: float


@dataclass(frozen=True)
class Unmovable:
    vm_uuid: str
    vm_name: str
    reason: str


@dataclass(frozen=True)
class DrainPlan:
    migrations: tuple[PlannedMigration, ...]
    unmovable: tuple[Unmovable, ...]
    predicted_makespan_s: float
    bound: LowerBound  # the lower bound and its parts
    concurrency: int
    deadline_s: float | None = None  # the policy's
    warnings: tuple[str, ...] = ()  # e.g. the predicted makespan exceeds the deadline

    @property
    def lower_bound_s(self) -> float:
        return self.bound.bound_s

    @property
    def meets_deadline(self) -> bool:
        return self.deadline_s is None or self.predicted_makespan_s <= self.deadline_s


def need_bandwidth(vm: VmSpec, settings: Settings, full_bw: float, params: ModelParams) -> float:
    """Smallest bandwidth (to 2 %) at which the VM converges with these settings."""
    if settings.postcopy_after_first_round:
        return 0.0
    pre = Settings(settings.downtime_limit_ms, auto_converge=settings.auto_converge)
    lo, hi = 0.0, full_bw
    if run_alone(vm, full_bw * 0.02, pre, params).outcome is Outcome.COMPLETED:
        return full_bw * 0.02
    for _ in range(8):
        mid = (lo + hi) / 2
        if run_alone(vm, mid, pre, params).outcome is Outcome.COMPLETED:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class _Item:
    vm: VmSpec
    target: str | None
    prediction: Prediction
    settings: Settings
    need: float


class PlanStrategy:
    """Start VMs in order (backfilling) while slots, per-target slots and bandwidth allow,
    as the executor does; a watchdog escalates a migration that runs far past its
    prediction: it raises the downtime limit for the migration's share of the link (and,
    as the executor does, starts nothing beside it until it ends), then post-copy, then
    abort."""

    def __init__(
        self,
        name: str,
        items: Sequence[_Item],
        max_parallel: int,
        per_target: int,
        total_bw: float,
        cap_ms: dict[str, float],
        params: ModelParams,
    ) -> None:
        self.name = name
        self.queue = list(items)
        self.max_parallel = max_parallel
        self.per_target = per_target
        self.total_bw = total_bw
        self.by_uuid = {i.vm.uuid: i for i in items}
        self.cap_ms = cap_ms
        self.params = params
        self.escalations: dict[str, int] = {}  # by VM uuid (an id() is reused once freed)
        self.raised: set[str] = set()  # VMs whose limit the watchdog raised: they hold the link
        self.sharing = 1  # migrations running at the last dispatch

    def remaining(self) -> int:
        return len(self.queue)

    def next_jobs(self, now_s: float, running: Sequence[Migration]) -> list[Job]:
        """The executor's dispatch rule (``dispatch.ready_to_start``) over the plan's order."""
        self.sharing = max(1, len(running))
        busy = [
            self._slot(self.by_uuid[m.vm.uuid], m.in_precopy, m.vm.uuid in self.raised)
            for m in running
        ]
        chosen = ready_to_start(
            [self._slot(i) for i in self.queue],
            busy,
            max_parallel=self.max_parallel,
            max_parallel_per_target=self.per_target,
            link_bytes_per_s=self.total_bw,
        )
        starting = {c.vm_uuid for c in chosen}
        jobs = [Job(i.vm, i.settings, i.target) for i in self.queue if i.vm.uuid in starting]
        self.queue = [i for i in self.queue if i.vm.uuid not in starting]
        return jobs

    @staticmethod
    def _slot(item: _Item, in_precopy: bool = True, holds_link: bool = False) -> Slot:
        return Slot(item.vm.uuid, item.target, item.need, in_precopy, holds_link)

    def next_control_s(self, mig: Migration) -> float:
        if not mig.in_precopy:
            return math.inf
        pred = self.by_uuid[mig.vm.uuid].prediction.total_s
        level = self.escalations.get(mig.vm.uuid, 0)
        return mig.start_s + (level + 1) * (2.0 * pred + 30.0)

    def control(self, mig: Migration, now_s: float) -> None:
        """Watchdog: raise the downtime limit to the cap, then post-copy, then abort."""
        level = self.escalations.get(mig.vm.uuid, 0)
        self.escalations[mig.vm.uuid] = level + 1
        share = self.total_bw / self.sharing
        top = qemu_downtime_limit_ms(self.cap_ms[mig.vm.uuid], share, self.params)
        if level == 0 and mig.downtime_limit_ms < top:
            mig.set_downtime_limit(top)
            self.raised.add(mig.vm.uuid)
        elif not mig.start_postcopy() and level >= 2:
            mig.abort()


def _cap(vm: VmSpec, policy: DrainPolicy) -> float:
    return vm.max_downtime_ms if vm.max_downtime_ms is not None else policy.max_downtime_ms


def _place(
    vm: VmSpec, targets: Sequence[TargetHost], used: dict[str, list[VmSpec]]
) -> str | None | Unmovable:
    if not targets:
        return None
    best: TargetHost | None = None
    best_key: tuple[int, int] | None = None  # (soft group conflicts, -free memory)
    why: list[str] = []
    together = _affinity_targets(vm, targets, used)
    for t in targets:
        placed = used[t.name]
        free_mem = t.free_memory_bytes - sum(p.memory_bytes for p in placed)
        free_cpu = t.free_vcpus - sum(p.vcpus for p in placed)
        if not t.healthy:
            why.append(f"{t.name}: unhealthy")
        elif free_mem < vm.memory_bytes:
            why.append(f"{t.name}: {free_mem // MIB} MiB free < {vm.memory_bytes // MIB} MiB")
        elif free_cpu < vm.vcpus:
            why.append(f"{t.name}: {free_cpu} vCPUs free < {vm.vcpus}")
        elif t.cpu_compatible is not None and vm.uuid not in t.cpu_compatible:
            why.append(f"{t.name}: CPU model not supported")
        elif not _groups_ok(vm, t, placed):
            why.append(f"{t.name}: anti-affinity")
        elif together is not None and t.name not in together:
            why.append(f"{t.name}: affinity")
        else:
            key = (_soft_conflicts(vm, t, placed), -free_mem)
            if best_key is None or key < best_key:
                best, best_key = t, key
    if best is None:
        return Unmovable(
            vm.uuid,
            vm.name,
            "no target host with capacity, CPU and group fit (" + "; ".join(why) + ")",
        )
    return best.name


def _members(g_id: str, t: TargetHost, placed: Sequence[VmSpec]) -> int:
    """Members of group ``g_id`` on ``t``: already there (at least one) or placed by the plan."""
    there = 1 if g_id in t.server_groups else 0
    return there + sum(1 for p in placed if any(g.id == g_id for g in p.server_groups))


def _groups_ok(vm: VmSpec, t: TargetHost, placed: Sequence[VmSpec]) -> bool:
    """Hard anti-affinity: no other member of the group on the target."""
    return all(
        _members(g.id, t, placed) == 0 for g in vm.server_groups if g.policy == "anti-affinity"
    )


def _affinity_targets(
    vm: VmSpec, targets: Sequence[TargetHost], used: dict[str, list[VmSpec]]
) -> set[str] | None:
    """Hard affinity: the targets where the group's members are or go (None: any target)."""
    allowed: set[str] | None = None
    for g in vm.server_groups:
        if g.policy != "affinity":
            continue
        hosts = {t.name for t in targets if _members(g.id, t, used[t.name]) > 0}
        if hosts:
            allowed = hosts if allowed is None else allowed & hosts
    return allowed


def _soft_conflicts(vm: VmSpec, t: TargetHost, placed: Sequence[VmSpec]) -> int:
    """Soft policies, as a cost to minimise: members of a soft-anti-affinity group already on
    the target, and for a soft-affinity group a target without its members."""
    cost = 0
    for g in vm.server_groups:
        if g.policy == "soft-anti-affinity":
            cost += _members(g.id, t, placed)
        elif g.policy == "soft-affinity":
            cost += 0 if _members(g.id, t, placed) > 0 else 1
    return cost


def plan_drain(
    vms: Sequence[VmSpec],
    targets: Sequence[TargetHost],
    link: Link,
    policy: DrainPolicy,
    params: ModelParams = DEFAULT_PARAMS,
) -> DrainPlan:
    full_bw = effective_bandwidth(link, params)
    link_bw = link.bandwidth_bytes_per_s * params.link_efficiency
    used: dict[str, list[VmSpec]] = {t.name: [] for t in targets}
    unmovable: list[Unmovable] = []
    base: list[tuple[VmSpec, str | None, Prediction]] = []
    for vm in sorted(vms, key=lambda v: -v.memory_bytes):
        if vm.blockers:
            unmovable.append(Unmovable(vm.uuid, vm.name, "blocked: " + ", ".join(vm.blockers)))
            continue
        pred = predict_at(vm, full_bw, policy, params)
        if pred.tuning is Tuning.CANNOT_CONVERGE:
            unmovable.append(Unmovable(vm.uuid, vm.name, CANNOT_CONVERGE_REASON))
            continue
        where = _place(vm, targets, used)
        if isinstance(where, Unmovable):
            unmovable.append(where)
            continue
        if where is not None:
            used[where].append(vm)
        base.append((vm, where, pred))
    cap_ms = {v.uuid: _cap(v, policy) for v in vms}
    bound = lower_bound([v for v, _, _ in base], link, policy, params)
    best: tuple[float, int, SimResult, list[_Item]] | None = None
    for k in range(1, max(1, policy.max_parallel_per_source) + 1):
        worst = min(full_bw, link_bw / k)
        items = []
        for vm, where, pred in base:
            settings = _fastest_settings(vm, pred, full_bw, worst, policy, params)
            need = need_bandwidth(vm, settings, full_bw, params)
            if policy.allow_postcopy and not settings.postcopy_permitted:
                s = settings  # permit post-copy at start so the watchdog can use it later
                settings = Settings(s.downtime_limit_ms, s.auto_converge, True, False)
            items.append(_Item(vm, where, pred, settings, need))
        orders = (
            sorted(items, key=lambda i: (-i.need, -i.vm.sent_bytes)),
            sorted(items, key=lambda i: -i.vm.sent_bytes),
            sorted(items, key=lambda i: (i.need, -i.vm.sent_bytes)),
            sorted(items, key=lambda i: -i.prediction.total_s),
        )
        for order in orders:
            key, res = _evaluate(order, k, link, link_bw, cap_ms, policy, params)
            if best is None or key < best[0]:
                best = (key, k, res, order)
    if best is None:
        return DrainPlan((), tuple(unmovable), 0.0, bound, 0, policy.deadline_s)
    _, k, res, order = best
    starts = {r.uuid: r for r in res.vms}
    by_start = sorted(order, key=lambda i: starts[i.vm.uuid].start_s)
    planned = tuple(
        PlannedMigration(
            vm_uuid=i.vm.uuid,
            vm_name=i.vm.name,
            target=i.target,
            position=pos,
            start_s=starts[i.vm.uuid].start_s,
            predicted_total_s=starts[i.vm.uuid].end_s - starts[i.vm.uuid].start_s,
            predicted_downtime_ms=starts[i.vm.uuid].downtime_ms,
            tuning=i.prediction.tuning,
            settings=i.settings,
            need_bytes_per_s=i.need,
        )
        for pos, i in enumerate(by_start)
    )
    warnings: list[str] = []
    if policy.deadline_s is not None and res.makespan_s > policy.deadline_s:
        warnings.append(
            f"predicted makespan {res.makespan_s:.0f} s exceeds the deadline "
            f"{policy.deadline_s:.0f} s (lower bound {bound.bound_s:.0f} s)"
        )
    if res.event_cap_hit:
        warnings.append("the plan's simulation did not end: its prediction is unreliable")
    return DrainPlan(
        planned,
        tuple(unmovable),
        res.makespan_s,
        bound,
        k,
        policy.deadline_s,
        tuple(warnings),
    )


def _evaluate(
    order: Sequence[_Item],
    k: int,
    link: Link,
    link_bw: float,
    cap_ms: dict[str, float],
    policy: DrainPolicy,
    params: ModelParams,
) -> tuple[float, SimResult]:
    """Simulate an order with at most ``k`` at once; its key (lower is better) and result."""
    strat = PlanStrategy("plan", order, k, policy.max_parallel_per_target, link_bw, cap_ms, params)
    res = simulate([i.vm for i in order], strat, link, params, seed=0, policy=policy)
    late = policy.deadline_s is not None and res.makespan_s > policy.deadline_s
    # failures first, then a plan that meets the deadline, then the soonest
    key = res.makespan_s + 1e6 * (res.failed + res.over_downtime) + (1e5 if late else 0)
    return key, res


def _fastest_settings(
    vm: VmSpec,
    pred: Prediction,
    full_bw: float,
    worst_bw: float,
    policy: DrainPolicy,
    params: ModelParams,
) -> Settings:
    """Within what the operator allows, the pre-copy settings that finish soonest.

    A limit up to the cap (less the margin) costs the guest nothing the operator has not
    accepted and cuts the rounds; auto-converge (CPU-bound writers only) is taken when it
    shortens the migration by a fifth or more. Post-copy stays the last resort.
    """
    top = qemu_downtime_limit_ms(_cap(vm, policy), full_bw, params, worst_bw)
    if pred.tuning is Tuning.POSTCOPY:
        return dataclasses.replace(pred.settings, downtime_limit_ms=top)
    first = min(pred.settings.downtime_limit_ms, top)
    best = Settings(first, auto_converge=pred.settings.auto_converge)
    best_s = math.inf
    for cand in (best, Settings(top, auto_converge=best.auto_converge)):
        mig = run_alone(vm, full_bw, cand, params)
        if mig.outcome is Outcome.COMPLETED and mig.end_s is not None:
            if mig.end_s < 0.95 * best_s:
                best, best_s = cand, mig.end_s
    if policy.allow_auto_converge and vm.writer is WriterKind.CPU and not best.auto_converge:
        auto = Settings(top, auto_converge=True)
        mig = run_alone(vm, full_bw, auto, params)
        if mig.outcome is Outcome.COMPLETED and mig.end_s is not None and mig.end_s < 0.8 * best_s:
            best, best_s = auto, mig.end_s
    if math.isinf(best_s) and policy.allow_postcopy:
        return Settings(top, postcopy_permitted=True, postcopy_after_first_round=True)
    return best


def plan_strategy(
    plan: DrainPlan,
    vms: Sequence[VmSpec],
    link: Link,
    policy: DrainPolicy,
    params: ModelParams = DEFAULT_PARAMS,
) -> PlanStrategy:
    """The plan as a simulator strategy, to run it against (true) ``vms``."""
    by_uuid = {v.uuid: v for v in vms}
    items = []
    for m in plan.migrations:
        pred = Prediction(
            m.tuning,
            True,
            True,
            m.predicted_total_s,
            m.predicted_downtime_ms,
            0,
            0.0,
            m.settings.downtime_limit_ms,
            m.settings,
        )
        items.append(_Item(by_uuid[m.vm_uuid], m.target, pred, m.settings, m.need_bytes_per_s))
    cap_ms = {v.uuid: _cap(v, policy) for v in vms}
    link_bw = link.bandwidth_bytes_per_s * params.link_efficiency
    return PlanStrategy(
        "hostmaint",
        items,
        plan.concurrency,
        policy.max_parallel_per_target,
        link_bw,
        cap_ms,
        params,
    )
