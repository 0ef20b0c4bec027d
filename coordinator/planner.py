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
tuning (found by bisection on the model); a VM starts when a slot is free and, with it
started, every pre-copying migration still needs no more than its even share of the
link (pre-copy sends flat out, so sharing migrations split the link evenly), so sharing
never stops a dirty VM from converging. Several orders and concurrency caps are
simulated with the reported VMs and the shortest makespan wins: two dirty VMs at half bandwidth each
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

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import zip_longest

from hostmaint.coordinator import escalation
from hostmaint.coordinator.bounds import LowerBound, lower_bound
from hostmaint.coordinator.model import (
    DEFAULT_PARAMS,
    FULLY_CAPABLE,
    DrainPolicy,
    HostCapabilities,
    Link,
    ModelParams,
    Prediction,
    Settings,
    TargetHost,
    Tuning,
    VmSpec,
    WriterKind,
    effective_bandwidth,
)
from hostmaint.coordinator.placement import Unmovable as Unmovable
from hostmaint.coordinator.placement import place
from hostmaint.coordinator.planstrategy import HELD_BACK_BYTES_PER_S as HELD_BACK_BYTES_PER_S
from hostmaint.coordinator.planstrategy import MAX_BURST_S as MAX_BURST_S
from hostmaint.coordinator.planstrategy import PlanItem, PlanStrategy
from hostmaint.coordinator.plantuning import (
    burst_window_s,
    options,
    precopy_tries,
    whole_link_limit_ms,
    with_burst,
    with_rate_assumed,
)
from hostmaint.coordinator.simulator import SimResult, VmResult, simulate

CANNOT_CONVERGE_REASON = "cannot converge: skip or stop the VM's workload"
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


@dataclass(frozen=True)
class _Candidate:
    """A candidate plan, as ``_evaluate`` simulated it."""

    key: float  # lower is better (``_evaluate``)
    k: int  # its concurrency
    res: SimResult
    order: list[PlanItem]  # its items in order (their times alone)
    refs: list[PlanItem]  # the items with the predictions the ladder checks


# ``_evaluate`` for one host: an order and a concurrency to its key, result and items
_Evaluate = Callable[[Sequence[PlanItem], int], tuple[float, SimResult, list[PlanItem]]]


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
        vm, pred, assumed = with_rate_assumed(vm, full_bw, plan_policy, params)
        if pred.tuning is Tuning.CANNOT_CONVERGE:
            why = CANNOT_CONVERGE_REASON
            if policy.allow_postcopy and not plan_policy.allow_postcopy:
                why = (
                    "cannot converge without post-copy, which the source host cannot do "
                    f"({source.postcopy_reason}): skip or stop the VM's workload"
                )
            unmovable.append(Unmovable(vm.uuid, vm.name, why))
            continue
        where = place(vm, targets, used, needs_postcopy=pred.tuning is Tuning.POSTCOPY)
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
        top_ms = whole_link_limit_ms(
            vm, full_bw, full_bw, vm_policy, params
        )  # the whole link's limit
        tries = 0
        if assumed is not None and vm_policy.allow_postcopy:
            tries = precopy_tries(vm, full_bw, top_ms, params)
        burst_s = burst_window_s(vm, full_bw, top_ms, params)
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
    choices: dict[
        tuple[int, str], PlanItem
    ] = {}  # (k, VM): its pre-copy choice instead of post-copy
    for k in range(1, max(1, policy.max_parallel_per_source) + 1):
        worst = min(full_bw, link_bw / k)
        items = []
        for vm, where, pred, assumed, tries, burst_s, vm_policy in base:
            fast, precopy = options(
                vm, where, pred, assumed, tries, full_bw, worst, vm_policy, params
            )
            fast = with_burst(fast, burst_s)
            precopy = None if precopy is None else with_burst(precopy, burst_s)
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
            if best is None or key < best.key:
                best = _Candidate(key, k, res, order, refs)
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
    k, res, refs = best.k, best.res, best.refs
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
    key, k, res, order, refs = best.key, best.k, best.res, best.order, best.refs
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
    return _Candidate(key, k, res, order, refs)


def _interleaved(items: Sequence[PlanItem]) -> list[PlanItem]:
    """The longest and the shortest alternately (by time alone): a long migration, bound
    by the link, runs beside short ones bound by their fixed costs (set-up, the zero-page
    scan), so neither the link nor the slots idle while the other is the limit."""
    by_time = sorted(items, key=lambda i: -i.prediction.total_s)
    half = (len(by_time) + 1) // 2
    longest, shortest = by_time[:half], by_time[half:][::-1]
    return [i for pair in zip_longest(longest, shortest) for i in pair if i is not None]


def _predicted_total_s(item: PlanItem, run: VmResult) -> float:
    """The plan's time for the VM: as simulated, but for a VM planned at its rate floor
    (simulated at its assumed rate) the time at the floor, which the ladder checks."""
    if item.simulated is not None:
        return item.prediction.total_s
    return run.end_s - run.start_s


def _evaluate(
    order: Sequence[PlanItem],
    k: int,
    link: Link,
    link_bw: float,
    cap_ms: dict[str, float],
    policy: DrainPolicy,
    params: ModelParams,
    source: HostCapabilities,
    pacing: escalation.Pacing,
) -> tuple[float, SimResult, list[PlanItem]]:
    """Simulate an order with at most ``k`` at once; its key (lower is better), result, and
    the items with the predictions the executor's ladder will check them against.

    Twice: the executor's ladder measures a migration against the plan's time for it in
    the schedule (shared link included), not its time alone. The first run, against the
    times alone, gives those schedule times; the second runs the ladder against them, as
    the executor will (against the second run's times, which the plan publishes: one step
    short of a fixed point)."""
    throttles = throttle_helps([i.vm for i in order], policy)
    vms = [i.simulated or i.vm for i in order]

    def run(items: Sequence[PlanItem]) -> SimResult:
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


def _fewer_postcopies(
    best: _Candidate,
    choices: dict[tuple[int, str], PlanItem],
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
    key, k, res, order, refs = best.key, best.k, best.res, best.order, best.refs
    budget = res.makespan_s * (1.0 + stretch)
    fast = {i.vm.uuid: i.prediction.total_s for i in order}
    swaps = sorted(
        (choices[(k, i.vm.uuid)] for i in order if (k, i.vm.uuid) in choices),
        key=lambda c: c.prediction.total_s - fast[c.vm.uuid],
    )
    while swaps:
        fitting: list[tuple[float, SimResult, list[PlanItem], list[PlanItem], PlanItem]] = []
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
    return _Candidate(key, k, res, order, refs)


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
            tuning=m.tuning,
            converges=True,
            converges_untuned=True,
            total_s=m.predicted_total_s,
            downtime_ms=m.predicted_downtime_ms,
            rounds=0,
            bytes_sent=0.0,
            qemu_downtime_limit_ms=m.settings.downtime_limit_ms,
            settings=m.settings,
        )
        vm = by_uuid[m.vm_uuid]
        items.append(PlanItem(vm, m.target, pred, m.settings, m.need_bytes_per_s, m.holds_link))
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
