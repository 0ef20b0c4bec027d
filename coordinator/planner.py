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
    predicted time and downtime, tuning and the QEMU ``Settings`` to start it with, and
    whether it runs alone (``holds_link``).
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
gain from overlapping their fixed set-up costs and per-stream bandwidth caps; one of the
orders alternates the longest and the shortest, so that migrations bound by the link
run beside ones bound by their fixed costs. The plan chosen (after the trade of
post-copies below) is then refined by local search, one VM moved at a time
(``_reordered``): a large VM with little in use spends most of its migration scanning
zero pages, a slot held and the link unused, and those scans should run while other
migrations send. The simulation steers each migration with the executor's escalation
ladder.

Tuning: each VM's downtime limit holds for the share it may drop to at the switch-over
(the link over the concurrency); one that converges only with the whole link's limit
runs alone. Where post-copy is sooner than a costly pre-copy (throttled, alone, a writer
of unknown rate planned at its floor, or ``COSTLY_PRECOPY_RATIO`` times longer than the
post-copy), the soonest plan takes it; then VMs go back to pre-copy, each time the one
that lengthens the simulated drain least, while the drain stays within the policy's
``postcopy_avoidance_stretch`` of that plan (each post-copy is a VM lost if the network
fails during it). A VM that converges alone on the whole link with the whole link's
limit may hold the link for its switch-over (``Settings.burst_s``: the ladder's burst,
before a post-copy switch or an abort, which the plan's simulation runs too): sharing
the link, a hot set that fits only the whole link's limit then moves by pre-copy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from itertools import zip_longest

from hostmaint.coordinator import escalation
from hostmaint.coordinator.bounds import LowerBound, lower_bound
from hostmaint.coordinator.dispatch import Slot, ready_to_start
from hostmaint.coordinator.model import (
    DEFAULT_PARAMS,
    FULLY_CAPABLE,
    MIB,
    DrainPolicy,
    HostCapabilities,
    Link,
    Migration,
    ModelParams,
    Outcome,
    Phase,
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
from hostmaint.coordinator.simulator import Job, SimResult, VmResult, simulate

CANNOT_CONVERGE_REASON = "cannot converge: skip or stop the VM's workload"
# A pre-copy this many times longer alone than the VM's post-copy (resending a hot working
# set round after round, holding most of the link) is costly: post-copy is offered.
COSTLY_PRECOPY_RATIO = 1.5
# A writer whose rate is known only from below, planned for post-copy, first gets the
# pre-copy rounds it would need at its floor rate, up to this many.
MAX_PRECOPY_TRIES = 4
# A migration holding the link for its switch-over caps the others to this (libvirt's
# smallest cap: 1 MiB/s), for the time its rounds after the first pass take alone on the
# link, and a poll; within these bounds (longer bursts stall the others more than the
# post-copies they save are worth on the benchmark's hosts).
HELD_BACK_BYTES_PER_S = float(MIB)
BURST_POLL_S = 1.0
MIN_BURST_S, MAX_BURST_S = 1.0, 3.0
# The chosen order is refined by moving one VM at a time while a move ends the simulated
# drain at least this much sooner, within this many simulated plans.
MIN_REORDER_GAIN_S = 0.5
REORDER_BUDGET = 16


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
    # it runs alone (starts when nothing runs, nothing starts beside it): its limit is set
    # for the whole link, which a neighbour's sending would cut at the switch-over
    holds_link: bool = False


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
    notes: tuple[str, ...] = ()  # tuning left out because a host cannot do it
    # as simulated: what the source host can tune, and the ladder's pace
    source: HostCapabilities = FULLY_CAPABLE
    pacing: escalation.Pacing = escalation.DEFAULT_PACING

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
    holds_link: bool = False
    # the VM the plan's simulation runs when it is not ``vm``: a writer planned at its
    # rate floor is simulated at its assumed rate, so the plan counts the ladder's cost
    simulated: VmSpec | None = None


# a candidate plan: its key, concurrency, simulated result, items (their times alone) and
# the items with the predictions the ladder checks (``_evaluate``)
_Candidate = tuple[float, int, SimResult, list[_Item], list[_Item]]
# ``_evaluate`` for one host: an order and a concurrency to its key, result and items
_Evaluate = Callable[[Sequence[_Item], int], tuple[float, SimResult, list[_Item]]]


class PlanStrategy:
    """Start VMs in order (backfilling) while slots, per-target slots and bandwidth allow,
    and steer each running migration with the executor's escalation ladder
    (``escalation.next_step`` over ``escalation.limits_for``, at the drain's ``pacing``),
    fed every ``pacing.poll_interval_s`` with what the agent would report: elapsed time,
    QEMU's round, the bytes left in it, the bandwidth it got, its limit. A migration whose
    limit the ladder raised holds the link, as in the executor; one in a burst caps its
    pre-copying neighbours until it releases the link or leaves pre-copy. The ladder
    takes no step the ``source`` host cannot."""

    def __init__(
        self,
        name: str,
        items: Sequence[_Item],
        max_parallel: int,
        per_target: int,
        total_bw: float,
        cap_ms: dict[str, float],
        params: ModelParams,
        allow_postcopy: bool,
        cpu_bound: Collection[str],
        *,
        source: HostCapabilities = FULLY_CAPABLE,
        pacing: escalation.Pacing = escalation.DEFAULT_PACING,
    ) -> None:
        self.name = name
        self.queue = list(items)
        self.max_parallel = max_parallel
        self.per_target = per_target
        self.total_bw = total_bw
        self.poll_s = pacing.poll_interval_s
        self.by_uuid = {i.vm.uuid: i for i in items}
        self.queued = {i.vm.uuid: self._slot(i) for i in items}  # as dispatch sees them queued
        self.limits = {
            i.vm.uuid: escalation.limits_for(
                predicted_total_s=i.prediction.total_s,
                operator_cap_ms=cap_ms[i.vm.uuid],
                link_bytes_per_s=total_bw,
                settings=i.settings,
                allow_postcopy=allow_postcopy,
                cpu_bound=i.vm.uuid in cpu_bound,
                source=source,
                pacing=pacing,
                params=params,
            )
            for i in items
        }
        # per running VM (by uuid: an id() is reused once freed)
        self.history: dict[str, list[escalation.Observation]] = {}
        self.done: dict[str, escalation.Escalation] = {}
        self.polled: dict[str, tuple[float, float]] = {}  # last poll: time, bytes sent
        self.raised: set[str] = set()  # VMs whose limit the ladder raised: they hold the link
        self.sharing = 1  # migrations running at the last dispatch
        self.live: dict[str, Migration] = {}  # the running migrations, at the last dispatch
        self.holder: str | None = None  # the VM holding the link for its switch-over
        self.held: list[Migration] = []  # the migrations it holds back

    def remaining(self) -> int:
        return len(self.queue)

    def next_jobs(self, now_s: float, running: Sequence[Migration]) -> list[Job]:
        """The executor's dispatch rule (``dispatch.ready_to_start``) over the plan's order."""
        self.sharing = max(1, len(running))
        self.live = {m.vm.uuid: m for m in running}
        if self.holder is not None:
            holder = self.live.get(self.holder)
            if holder is None or holder.phase not in (Phase.PRECOPY, Phase.SWITCHOVER):
                self._release()  # switched over (or ended): the others get the link back
            else:
                return []  # nothing starts while a migration holds the link
        if not self.queue or len(running) >= self.max_parallel:
            return []  # what ready_to_start would answer, without building the slots
        busy = [
            self._slot(self.by_uuid[m.vm.uuid], m.in_precopy, m.vm.uuid in self.raised)
            for m in running
        ]
        chosen = ready_to_start(
            [self.queued[i.vm.uuid] for i in self.queue],
            busy,
            max_parallel=self.max_parallel,
            max_parallel_per_target=self.per_target,
            link_bytes_per_s=self.total_bw,
        )
        starting = {c.vm_uuid for c in chosen}
        jobs = [
            Job(i.simulated or i.vm, i.settings, i.target)
            for i in self.queue
            if i.vm.uuid in starting
        ]
        self.queue = [i for i in self.queue if i.vm.uuid not in starting]
        return jobs

    @staticmethod
    def _slot(item: _Item, in_precopy: bool = True, raised: bool = False) -> Slot:
        return Slot(item.vm.uuid, item.target, item.need, in_precopy, raised or item.holds_link)

    def next_control_s(self, mig: Migration) -> float:
        if not mig.in_precopy:
            return math.inf
        last_s, _ = self.polled.get(mig.vm.uuid, (mig.start_s, 0.0))
        return last_s + self.poll_s

    def control(self, mig: Migration, now_s: float) -> None:
        """One progress sample, and the ladder's step if it calls for one."""
        uuid = mig.vm.uuid
        last_s, last_bytes = self.polled.get(uuid, (mig.start_s, 0.0))
        self.polled[uuid] = (now_s, mig.bytes_sent)
        history = self.history.setdefault(uuid, [])
        held_back = self.holder is not None and self.holder != uuid
        history.append(
            escalation.Observation(
                elapsed_s=now_s - mig.start_s,
                iteration=mig.rounds,
                remaining_bytes=int(mig.remaining),
                bandwidth_bytes_per_s=(mig.bytes_sent - last_bytes) / max(now_s - last_s, 1e-9),
                max_downtime_ms=int(mig.downtime_limit_ms),
                postcopy=mig.postcopy,
                first_pass_done=mig.rounds >= 2,
                fair_share_bytes_per_s=self.total_bw / self.sharing,
                held_back=held_back,
            )
        )
        done = self.done.get(uuid, escalation.Escalation())
        decision = escalation.next_step(history, self.limits[uuid], done)
        action = decision.action
        ok = True
        if action is escalation.Action.RAISE_DOWNTIME:
            mig.set_downtime_limit(decision.value)
            self.raised.add(uuid)
        elif action is escalation.Action.THROTTLE_VCPUS:
            mig.throttle_vcpus(decision.value)
        elif action is escalation.Action.HOLD_LINK:
            self.holder = uuid
            # QEMU's cap binds pre-copy only (post-copy has its own)
            self.held = [m for u, m in self.live.items() if u != uuid and m.in_precopy]
            for m in self.held:
                m.bandwidth_cap = HELD_BACK_BYTES_PER_S
            mig.set_downtime_limit(decision.value)
        elif action is escalation.Action.RELEASE_LINK:
            mig.set_downtime_limit(decision.value)  # before the others send again
            self._release()
        elif action is escalation.Action.POSTCOPY:
            ok = mig.start_postcopy()
        elif action is escalation.Action.ABORT:
            mig.abort()
        self.done[uuid] = escalation.applied(done, decision, now_s - mig.start_s, ok)

    def _release(self) -> None:
        for m in self.held:
            m.bandwidth_cap = m.settings.max_bandwidth_bytes_per_s
        self.holder, self.held = None, []


def _place(
    vm: VmSpec,
    targets: Sequence[TargetHost],
    used: dict[str, list[VmSpec]],
    needs_postcopy: bool = False,
) -> str | None | Unmovable:
    """The target with room and fit (and post-copy, for a VM only post-copy moves) whose
    soft group policies suffer least, then the one with most free memory."""
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
            refusal = dict(t.cpu_refusals).get(vm.uuid, "CPU model not supported")
            why.append(f"{t.name}: {refusal}")
        elif needs_postcopy and not t.capabilities.postcopy:
            why.append(f"{t.name}: no post-copy ({t.capabilities.postcopy_reason})")
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
    *,
    source: HostCapabilities = FULLY_CAPABLE,
    pacing: escalation.Pacing = escalation.DEFAULT_PACING,
) -> DrainPlan:
    """The plan (see the module's docstring). ``source``: what the source host can tune
    (no post-copy without its userfaultfd, no vCPU throttle in the ladder without its CPU
    controller); each target's ``capabilities`` likewise for the post-copies sent there.
    ``pacing``: the ladder's, as the drain will run it."""
    full_bw = effective_bandwidth(link, params)
    link_bw = link.bandwidth_bytes_per_s * params.link_efficiency
    used: dict[str, list[VmSpec]] = {t.name: [] for t in targets}
    hosts = {t.name: t for t in targets}
    unmovable: list[Unmovable] = []
    # post-copy where the policy allows it and the source can; per VM, where its target can
    plan_policy = policy if source.postcopy else dataclasses.replace(policy, allow_postcopy=False)
    no_postcopy = dataclasses.replace(policy, allow_postcopy=False)
    left_out: dict[str, int] = {}  # targets without post-copy: the VMs planned without it
    # each VM as planned, its target, prediction, VM at its assumed rate (if planned at
    # its floor), the pre-copy rounds a planned post-copy of it tries first, its burst and
    # its policy (without post-copy where its target has none)
    base: list[tuple[VmSpec, str | None, Prediction, VmSpec | None, int, float, DrainPolicy]] = []
    for vm in sorted(vms, key=lambda v: -v.memory_bytes):
        if vm.blockers:
            unmovable.append(Unmovable(vm.uuid, vm.name, "blocked: " + ", ".join(vm.blockers)))
            continue
        vm, pred, assumed = _with_rate_assumed(vm, full_bw, plan_policy, params)
        if pred.tuning is Tuning.CANNOT_CONVERGE:
            why = CANNOT_CONVERGE_REASON
            if policy.allow_postcopy and not plan_policy.allow_postcopy:
                why = (
                    "cannot converge without post-copy, which the source host cannot do "
                    f"({source.postcopy_reason}): skip or stop the VM's workload"
                )
            unmovable.append(Unmovable(vm.uuid, vm.name, why))
            continue
        where = _place(vm, targets, used, needs_postcopy=pred.tuning is Tuning.POSTCOPY)
        if isinstance(where, Unmovable):
            unmovable.append(where)
            continue
        vm_policy = plan_policy
        if where is not None:
            used[where].append(vm)
            if plan_policy.allow_postcopy and not hosts[where].capabilities.postcopy:
                # it moves by pre-copy there, with nothing permitted (one that needs
                # post-copy did not go there: its prediction stands without it)
                vm_policy = no_postcopy
                left_out[where] = left_out.get(where, 0) + 1
        top_ms = _top_ms(vm, full_bw, full_bw, vm_policy, params)  # the whole link's limit
        tries = 0
        if assumed is not None and vm_policy.allow_postcopy:
            tries = _precopy_tries(vm, full_bw, top_ms, params)
        burst_s = _burst_s(vm, full_bw, top_ms, params)
        base.append((vm, where, pred, assumed, tries, burst_s, vm_policy))
    cap_ms = {v.uuid: policy.downtime_cap_ms(v.max_downtime_ms) for v in vms}
    bound = lower_bound([b[0] for b in base], link, policy, params)
    evaluate = functools.partial(
        _evaluate,
        link=link,
        link_bw=link_bw,
        cap_ms=cap_ms,
        policy=policy,
        params=params,
        source=source,
        pacing=pacing,
    )
    notes = _left_out(base, hosts, left_out, policy, source)
    best: _Candidate | None = None
    choices: dict[tuple[int, str], _Item] = {}  # (k, VM): its pre-copy choice instead of post-copy
    for k in range(1, max(1, policy.max_parallel_per_source) + 1):
        worst = min(full_bw, link_bw / k)
        items = []
        for vm, where, pred, assumed, tries, burst_s, vm_policy in base:
            fast, precopy = _options(
                vm, where, pred, assumed, tries, full_bw, worst, vm_policy, params
            )
            fast = _with_burst(fast, burst_s)
            precopy = None if precopy is None else _with_burst(precopy, burst_s)
            items.append(fast)
            if precopy is not None:
                choices[(k, vm.uuid)] = precopy
        orders = (
            sorted(items, key=lambda i: (-i.need, -i.vm.sent_bytes)),
            sorted(items, key=lambda i: -i.vm.sent_bytes),
            sorted(items, key=lambda i: (i.need, -i.vm.sent_bytes)),
            sorted(items, key=lambda i: -i.prediction.total_s),
            _interleaved(items),
        )
        for order in orders:
            key, res, refs = evaluate(order, k)
            if best is None or key < best[0]:
                best = (key, k, res, order, refs)
    if best is None:
        return DrainPlan(
            (),
            tuple(unmovable),
            0.0,
            bound,
            0,
            policy.deadline_s,
            notes=tuple(notes),
            source=source,
            pacing=pacing,
        )
    best = _fewer_postcopies(best, choices, evaluate, policy.postcopy_avoidance_stretch)
    best = _reordered(best, evaluate)
    _, k, res, _, refs = best
    starts = {r.uuid: r for r in res.vms}
    by_start = sorted(refs, key=lambda i: starts[i.vm.uuid].start_s)
    planned = tuple(
        PlannedMigration(
            vm_uuid=i.vm.uuid,
            vm_name=i.vm.name,
            target=i.target,
            position=pos,
            start_s=starts[i.vm.uuid].start_s,
            predicted_total_s=_predicted_total_s(i, starts[i.vm.uuid]),
            predicted_downtime_ms=starts[i.vm.uuid].downtime_ms,
            tuning=i.prediction.tuning,
            settings=i.settings,
            need_bytes_per_s=i.need,
            holds_link=i.holds_link,
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
        tuple(notes),
        source,
        pacing,
    )


def _left_out(
    base: Sequence[tuple[VmSpec, str | None, Prediction, VmSpec | None, int, float, DrainPolicy]],
    hosts: dict[str, TargetHost],
    left_out: dict[str, int],
    policy: DrainPolicy,
    source: HostCapabilities,
) -> list[str]:
    """What the plan left out because a host cannot do it, and the host's reason."""
    notes = []
    if policy.allow_postcopy and not source.postcopy:
        notes.append(f"post-copy left out: the source host cannot do it ({source.postcopy_reason})")
    for name, count in sorted(left_out.items()):
        notes.append(
            f"post-copy left out for the {count} VM{'s' if count > 1 else ''} going to {name}: "
            f"it cannot do it ({hosts[name].capabilities.postcopy_reason})"
        )
    if not source.vcpu_throttle and throttle_helps([b[0] for b in base], policy):
        notes.append(
            "vCPU throttling left out of the escalation ladder: the source host cannot do it "
            f"({source.vcpu_throttle_reason})"
        )
    return notes


def _reordered(best: _Candidate, evaluate: _Evaluate) -> _Candidate:
    """The chosen order refined by local search on the simulated drain: a VM moved to
    another place in the order, the first move that ends the drain at least
    ``MIN_REORDER_GAIN_S`` sooner (with no more post-copies) taken, until none does or
    ``REORDER_BUDGET`` simulated plans are spent. The moves, in this order:

    * a VM of the first wave (the first ``k``, which start together) to places ``k``,
      ``2k``, ``3k``: migrations of like size that start together end their first passes
      together, and their zero-page scans (a slot held, the link unused) coincide;
    * the VM that ends last to an earlier place (the start, each quarter of the way to
      its place): the drain ends with it.
    """
    key, k, res, order, refs = best
    seen = {tuple(i.vm.uuid for i in order)}
    spent = 0
    while spent < REORDER_BUDGET and len(order) > 1:
        ends = {r.uuid: r.end_s for r in res.vms}
        last = max(range(len(order)), key=lambda p: ends.get(order[p].vm.uuid, 0.0))
        moves = [(p, to) for p in range(min(k, len(order))) for to in (k, 2 * k, 3 * k)]
        moves += [(last, to) for to in range(0, last, max(1, last // 4))]
        for p, to in moves:
            if to >= len(order) or spent >= REORDER_BUDGET:
                continue
            trial = list(order)
            trial.insert(to, trial.pop(p))
            sig = tuple(i.vm.uuid for i in trial)
            if sig in seen:
                continue
            seen.add(sig)
            spent += 1
            t_key, t_res, t_refs = evaluate(trial, k)
            if t_key <= key - MIN_REORDER_GAIN_S and t_res.postcopy_count <= res.postcopy_count:
                key, res, order, refs = t_key, t_res, trial, t_refs
                break
        else:
            break  # no move helps
    return key, k, res, order, refs


def _interleaved(items: Sequence[_Item]) -> list[_Item]:
    """The longest and the shortest alternately (by time alone): a long migration, bound
    by the link, runs beside short ones bound by their fixed costs (set-up, the zero-page
    scan), so neither the link nor the slots idle while the other is the limit."""
    by_time = sorted(items, key=lambda i: -i.prediction.total_s)
    half = (len(by_time) + 1) // 2
    longest, shortest = by_time[:half], by_time[half:][::-1]
    return [i for pair in zip_longest(longest, shortest) for i in pair if i is not None]


def _predicted_total_s(item: _Item, run: VmResult) -> float:
    """The plan's time for the VM: as simulated, but for a VM planned at its rate floor
    (simulated at its assumed rate) the time at the floor, which the ladder checks."""
    if item.simulated is not None:
        return item.prediction.total_s
    return run.end_s - run.start_s


def _evaluate(
    order: Sequence[_Item],
    k: int,
    link: Link,
    link_bw: float,
    cap_ms: dict[str, float],
    policy: DrainPolicy,
    params: ModelParams,
    source: HostCapabilities,
    pacing: escalation.Pacing,
) -> tuple[float, SimResult, list[_Item]]:
    """Simulate an order with at most ``k`` at once; its key (lower is better), result, and
    the items with the predictions the executor's ladder will check them against.

    Twice: the executor's ladder measures a migration against the plan's time for it in
    the schedule (shared link included), not its time alone. The first run, against the
    times alone, gives those schedule times; the second runs the ladder against them, as
    the executor will (against the second run's times, which the plan publishes: one step
    short of a fixed point)."""
    throttles = throttle_helps([i.vm for i in order], policy)
    vms = [i.simulated or i.vm for i in order]

    def run(items: Sequence[_Item]) -> SimResult:
        strat = PlanStrategy(
            "plan",
            items,
            k,
            policy.max_parallel_per_target,
            link_bw,
            cap_ms,
            params,
            policy.allow_postcopy,
            throttles,
            source=source,
            pacing=pacing,
        )
        return simulate(vms, strat, link, params, seed=0, policy=policy)

    first = {r.uuid: r for r in run(order).vms}
    refs = [
        dataclasses.replace(
            i, prediction=dataclasses.replace(i.prediction, total_s=_predicted_total_s(i, r))
        )
        if (r := first.get(i.vm.uuid)) is not None
        else i
        for i in order
    ]
    res = run(refs)
    late = policy.deadline_s is not None and res.makespan_s > policy.deadline_s
    # failures first, then a plan that meets the deadline, then the soonest
    key = res.makespan_s + 1e6 * (res.failed + res.over_downtime) + (1e5 if late else 0)
    return key, res, refs


def _with_rate_assumed(
    vm: VmSpec, full_bw: float, policy: DrainPolicy, params: ModelParams
) -> tuple[VmSpec, Prediction, VmSpec | None]:
    """The VM as planned, its prediction, and the VM at its assumed rate when it is planned
    at its rate floor instead.

    A VM whose rate is known only to be at least its floor is planned at its assumed (high)
    rate when that still moves it by pre-copy without throttling or holding the link;
    otherwise at its floor, where a faster writer falls behind and meets the escalation
    ladder (raise, throttle, post-copy)."""
    pred = predict_at(vm, full_bw, policy, params)
    floor = vm.dirty_rate_floor_bytes_per_s
    if floor is None or pred.tuning in (Tuning.NONE, Tuning.RAISE_DOWNTIME):
        return vm, pred, None
    at_floor = dataclasses.replace(vm, dirty_rate_bytes_per_s=floor)
    floor_pred = predict_at(at_floor, full_bw, policy, params)
    if floor_pred.tuning in (Tuning.CANNOT_CONVERGE, Tuning.POSTCOPY):
        return vm, pred, None
    return at_floor, floor_pred, vm


def _options(
    vm: VmSpec,
    where: str | None,
    pred: Prediction,
    assumed: VmSpec | None,
    tries: int,
    full_bw: float,
    worst_bw: float,
    policy: DrainPolicy,
    params: ModelParams,
) -> tuple[_Item, _Item | None]:
    """The VM's fastest way to move, and its pre-copy way when the fastest is post-copy.

    A pre-copy that throttles the guest (auto-converge) or needs the link to itself costs
    the drain time; post-copy, where the policy allows it and it is sooner alone, is the
    fast way then, and the pre-copy one is kept for ``_fewer_postcopies``. So is a VM
    planned at its rate floor (``assumed``: the VM at its assumed rate): post-copy at the
    assumed rate, after ``tries`` pre-copy rounds (``_precopy_tries``), is its fast way,
    and its pre-copy is simulated at the assumed rate, so the plan takes it only where
    the ladder's rescue of a fast writer costs little.
    """
    settings, holds = _fastest_settings(vm, pred, full_bw, worst_bw, policy, params)
    need = need_bandwidth(vm, settings, full_bw, params)
    if policy.allow_postcopy and not settings.postcopy_permitted:
        s = settings  # permit post-copy at start so the ladder can use it later
        settings = Settings(s.downtime_limit_ms, s.auto_converge, True, False)
    if assumed is not None and policy.allow_postcopy:
        precopy = _Item(vm, where, pred, settings, need, holds, simulated=assumed)
        fast = _postcopy_item(assumed, where, pred, full_bw, worst_bw, policy, params, tries)
        return fast, precopy
    precopy = _Item(vm, where, pred, settings, need, holds)
    if not policy.allow_postcopy or pred.tuning is Tuning.POSTCOPY:
        return precopy, None
    fast = _postcopy_item(vm, where, pred, full_bw, worst_bw, policy, params)
    pre_run = run_alone(vm, full_bw, settings, params)
    if pre_run.end_s is None or fast.prediction.total_s >= pre_run.end_s:
        return precopy, None
    resends = pre_run.end_s > COSTLY_PRECOPY_RATIO * fast.prediction.total_s
    if not (holds or settings.auto_converge or resends):
        return precopy, None
    return fast, precopy


def _postcopy_item(
    vm: VmSpec,
    where: str | None,
    pred: Prediction,
    full_bw: float,
    worst_bw: float,
    policy: DrainPolicy,
    params: ModelParams,
    tries: int = 0,
) -> _Item:
    top = _top_ms(vm, full_bw, worst_bw, policy, params)
    post = Settings(
        top, postcopy_permitted=True, postcopy_after_first_round=True, precopy_tries=tries
    )
    run = run_alone(vm, full_bw, post, params)
    total_s = run.end_s if run.end_s is not None else math.inf
    post_pred = dataclasses.replace(pred, tuning=Tuning.POSTCOPY, total_s=total_s, settings=post)
    return _Item(vm, where, post_pred, post, 0.0)


def _top_ms(
    vm: VmSpec, full_bw: float, worst_bw: float, policy: DrainPolicy, params: ModelParams
) -> float:
    """QEMU's downtime limit for the whole link, safe if the share drops to ``worst_bw``."""
    return qemu_downtime_limit_ms(
        policy.downtime_cap_ms(vm.max_downtime_ms), full_bw, params, worst_bw
    )


def _burst_s(vm: VmSpec, full_bw: float, top_ms: float, params: ModelParams) -> float:
    """How long the VM may hold the link for its switch-over: 0 unless it converges alone on
    the whole link with the whole link's limit ``top_ms``; then the time its rounds after
    the first pass take there, and a poll (within the burst's bounds)."""
    run = run_alone(vm, full_bw, Settings(top_ms), params, params.max_precopy_bytes_factor)
    if run.outcome is not Outcome.COMPLETED:
        return 0.0
    # the rounds after the first pass there (each sends what the sync before it found),
    # and the poll that sees the end
    window_s = sum(run.pending_at_sync) / full_bw + BURST_POLL_S
    return min(MAX_BURST_S, max(MIN_BURST_S, window_s))


def _with_burst(item: _Item, burst_s: float) -> _Item:
    if not burst_s or item.holds_link:
        return item
    return dataclasses.replace(item, settings=dataclasses.replace(item.settings, burst_s=burst_s))


def _precopy_tries(at_floor: VmSpec, full_bw: float, top_ms: float, params: ModelParams) -> int:
    """Rounds after the first pass that pre-copy gets before a planned post-copy switch,
    for a writer known only to dirty at least at its floor rate: as many as it needs at
    its floor alone on the link (the same for every concurrency the planner tries: a
    writer that slow converges by pre-copy alone; a faster one, or one sharing the link,
    may switch after them), none when that is more than ``MAX_PRECOPY_TRIES``."""
    run = run_alone(at_floor, full_bw, Settings(top_ms), params)
    if run.outcome is not Outcome.COMPLETED:
        return 0
    tries = run.rounds - 1
    return tries if tries <= MAX_PRECOPY_TRIES else 0


def _fewer_postcopies(
    best: _Candidate,
    choices: dict[tuple[int, str], _Item],
    evaluate: _Evaluate,
    stretch: float,
) -> _Candidate:
    """Move VMs of the soonest plan from post-copy back to pre-copy (each post-copy is a VM
    lost if the network fails during it) while the drain stays within ``stretch`` (the
    policy's ``postcopy_avoidance_stretch``) of that plan's makespan: one at a time, each time the
    one whose move lengthens the simulated drain least (ties: the one whose pre-copy
    alone takes least longer than its post-copy). Greedy on the drain, not on the VM
    alone: a pre-copy that is cheap alone can cost the drain more, sharing the link.
    A VM whose rate is known goes back only if the simulation then has fewer post-copies
    (sharing the link, its pre-copy may still end in the ladder's post-copy, only
    later); one known only from below (``simulated`` at its assumed rate) is a bet that
    it writes slower, taken at the cost the simulation gives it."""
    key, k, res, order, refs = best
    budget = res.makespan_s * (1.0 + stretch)
    fast = {i.vm.uuid: i.prediction.total_s for i in order}
    swaps = sorted(
        (choices[(k, i.vm.uuid)] for i in order if (k, i.vm.uuid) in choices),
        key=lambda c: c.prediction.total_s - fast[c.vm.uuid],
    )
    while swaps:
        fitting: list[tuple[float, SimResult, list[_Item], list[_Item], _Item]] = []
        for pre in swaps:
            trial = [pre if i.vm.uuid == pre.vm.uuid else i for i in order]
            t_key, t_res, t_refs = evaluate(trial, k)
            no_worse = t_key - t_res.makespan_s <= key - res.makespan_s  # failures, deadline
            # a VM of known rate must leave post-copy in the simulation too; one known only
            # from below is a bet on its rate (simulated at the assumed one: at its cost)
            gains = pre.simulated is not None or t_res.postcopy_count < res.postcopy_count
            if t_res.makespan_s <= budget and no_worse and gains:
                fitting.append((t_key, t_res, trial, t_refs, pre))
        if not fitting:
            break
        key, res, order, refs, taken = min(fitting, key=lambda f: f[0])
        # not retried: one that did not fit or gain will hardly once the drain is longer
        swaps = [f[4] for f in fitting if f[4] is not taken]
    return key, k, res, order, refs


def _fastest_settings(
    vm: VmSpec,
    pred: Prediction,
    full_bw: float,
    worst_bw: float,
    policy: DrainPolicy,
    params: ModelParams,
) -> tuple[Settings, bool]:
    """Within what the operator allows, the settings that finish soonest, and whether the
    migration must hold the link.

    The limit is set so that the real downtime stays under the cap even if the migration's
    share drops to ``worst_bw`` at the switch-over. A VM that converges only with a higher
    limit gets the limit for the whole link and runs alone, so its share cannot drop.
    Post-copy only where the prediction found no pre-copy that converges.
    """
    if pred.tuning is Tuning.POSTCOPY:
        top = _top_ms(vm, full_bw, worst_bw, policy, params)
        return dataclasses.replace(pred.settings, downtime_limit_ms=top), False
    for worst, holds in ((worst_bw, False), (full_bw, worst_bw < full_bw)):
        top = _top_ms(vm, full_bw, worst, policy, params)
        settings, total_s = _fastest_precopy(vm, pred, full_bw, top, policy, params)
        if math.isfinite(total_s):
            return settings, holds
    return pred.settings, worst_bw < full_bw  # converged alone on the link, as predicted


def _fastest_precopy(
    vm: VmSpec,
    pred: Prediction,
    full_bw: float,
    top: float,
    policy: DrainPolicy,
    params: ModelParams,
) -> tuple[Settings, float]:
    """Pre-copy settings with QEMU's limit at most ``top`` that finish soonest, and when.

    A limit up to ``top`` costs the guest nothing the operator has not accepted and cuts
    the rounds; auto-converge (where the prediction allows it) is taken when it shortens
    the migration by a fifth or more.
    """
    first = min(pred.settings.downtime_limit_ms, top)
    best = Settings(first, auto_converge=pred.settings.auto_converge)
    best_s = math.inf
    for cand in (best, Settings(top, auto_converge=best.auto_converge)):
        mig = run_alone(vm, full_bw, cand, params)
        if mig.outcome is Outcome.COMPLETED and mig.end_s is not None:
            if mig.end_s < 0.95 * best_s:
                best, best_s = cand, mig.end_s
    if policy.allow_auto_converge and vm.writer is not WriterKind.PACED and not best.auto_converge:
        auto = Settings(top, auto_converge=True)
        mig = run_alone(vm, full_bw, auto, params)
        if mig.outcome is Outcome.COMPLETED and mig.end_s is not None and mig.end_s < 0.8 * best_s:
            best, best_s = auto, mig.end_s
    return best, best_s


def throttle_helps(vms: Sequence[VmSpec], policy: DrainPolicy) -> frozenset[str]:
    """The VMs the ladder may throttle: as the executor, every writer not known to be paced."""
    if not policy.allow_auto_converge:
        return frozenset()
    return frozenset(v.uuid for v in vms if v.writer is not WriterKind.PACED)


def plan_strategy(
    plan: DrainPlan,
    vms: Sequence[VmSpec],
    link: Link,
    policy: DrainPolicy,
    params: ModelParams = DEFAULT_PARAMS,
    reported: Sequence[VmSpec] | None = None,
) -> PlanStrategy:
    """The plan as a simulator strategy, to run it against (true) ``vms``; ``reported``: the
    VMs as planned (default ``vms``), whose writer kinds the ladder goes by. Its ladder is
    the plan's: what the source can do, at the pace planned."""
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
        vm = by_uuid[m.vm_uuid]
        items.append(_Item(vm, m.target, pred, m.settings, m.need_bytes_per_s, m.holds_link))
    cap_ms = {v.uuid: policy.downtime_cap_ms(v.max_downtime_ms) for v in vms}
    link_bw = link.bandwidth_bytes_per_s * params.link_efficiency
    return PlanStrategy(
        "hostmaint",
        items,
        plan.concurrency,
        policy.max_parallel_per_target,
        link_bw,
        cap_ms,
        params,
        policy.allow_postcopy,
        throttle_helps(vms if reported is None else reported, policy),
        source=plan.source,
        pacing=plan.pacing,
    )
