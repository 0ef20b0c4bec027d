"""Each VM's way to move in a plan: its QEMU settings, post-copy or not, its burst (pure).

Within what the operator allows, the settings that finish soonest; post-copy where
it is sooner than a costly pre-copy; a writer whose rate is known only from below
planned at its floor; the time a VM may hold the link for its switch-over.
"""

from __future__ import annotations

import dataclasses
import math

from hostmaint.coordinator.convergence import predict_at, run_alone
from hostmaint.coordinator.model import (
    DrainPolicy,
    ModelParams,
    Outcome,
    Prediction,
    Settings,
    Tuning,
    VmSpec,
    WriterKind,
    qemu_downtime_limit_ms,
)
from hostmaint.coordinator.planstrategy import (
    BURST_POLL_S,
    MAX_BURST_S,
    MIN_BURST_S,
    PlanItem,
    need_bandwidth,
)

# A pre-copy this many times longer alone than the VM's post-copy (resending a hot working
# set round after round, holding most of the link) is costly: post-copy is offered.
COSTLY_PRECOPY_RATIO = 1.5
# A writer whose rate is known only from below, planned for post-copy, first gets the
# pre-copy rounds it would need at its floor rate, up to this many.
MAX_PRECOPY_TRIES = 4


def with_rate_assumed(
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


def options(
    vm: VmSpec,
    where: str | None,
    pred: Prediction,
    assumed: VmSpec | None,
    tries: int,
    full_bw: float,
    worst_bw: float,
    policy: DrainPolicy,
    params: ModelParams,
) -> tuple[PlanItem, PlanItem | None]:
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
        settings = Settings(
            s.downtime_limit_ms,
            auto_converge=s.auto_converge,
            postcopy_permitted=True,
            postcopy_after_first_round=False,
        )
    if assumed is not None and policy.allow_postcopy:
        precopy = PlanItem(vm, where, pred, settings, need, holds, simulated=assumed)
        fast = _postcopy_item(assumed, where, pred, full_bw, worst_bw, policy, params, tries)
        return fast, precopy
    precopy = PlanItem(vm, where, pred, settings, need, holds)
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
) -> PlanItem:
    top = whole_link_limit_ms(vm, full_bw, worst_bw, policy, params)
    post = Settings(
        top, postcopy_permitted=True, postcopy_after_first_round=True, precopy_tries=tries
    )
    run = run_alone(vm, full_bw, post, params)
    total_s = run.end_s if run.end_s is not None else math.inf
    post_pred = dataclasses.replace(pred, tuning=Tuning.POSTCOPY, total_s=total_s, settings=post)
    return PlanItem(vm, where, post_pred, post, 0.0)


def whole_link_limit_ms(
    vm: VmSpec, full_bw: float, worst_bw: float, policy: DrainPolicy, params: ModelParams
) -> float:
    """QEMU's downtime limit for the whole link, safe if the share drops to ``worst_bw``."""
    return qemu_downtime_limit_ms(
        policy.downtime_cap_ms(vm.max_downtime_ms), full_bw, params, worst_bw
    )


def burst_window_s(vm: VmSpec, full_bw: float, top_ms: float, params: ModelParams) -> float:
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


def with_burst(item: PlanItem, burst_s: float) -> PlanItem:
    if not burst_s or item.holds_link:
        return item
    return dataclasses.replace(item, settings=dataclasses.replace(item.settings, burst_s=burst_s))


def precopy_tries(at_floor: VmSpec, full_bw: float, top_ms: float, params: ModelParams) -> int:
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
        top = whole_link_limit_ms(vm, full_bw, worst_bw, policy, params)
        return dataclasses.replace(pred.settings, downtime_limit_ms=top), False
    for worst, holds in ((worst_bw, False), (full_bw, worst_bw < full_bw)):
        top = whole_link_limit_ms(vm, full_bw, worst, policy, params)
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
