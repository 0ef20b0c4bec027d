"""When a running migration falls behind, the cheapest next step the policy allows (pure).

The ladder, cheapest first: raise QEMU's downtime limit to the most the
operator's limit permits at the bandwidth the migration gets now (it converges
at once when what is left fits; the dispatcher then starts nothing new beside
it, so its share cannot drop before the switch-over);
throttle the vCPUs of a CPU-bound writer, in steps; hold the link for the
switch-over (a migration whose dirty set fits its downtime at the whole link
but not at its share: the others are capped to a trickle and its limit raised
to the whole link's for ``burst_s``, then its limit is restored before the
others are released); switch to post-copy when the policy allows it (Nova:
force-complete); abort, to retry elsewhere or report. Each step gets time to
show its effect before the next; a migration held back by another's burst
takes no step while it lasts. A step the source host cannot take (no cgroup CPU
controller: no throttle; no userfaultfd: no post-copy) is left out, and the next
one follows.

``limits_for`` builds a migration's ``Limits`` from the plan's settings for it, the
source host's capabilities and the configured ``Pacing``: the one builder for the
plan's simulation and for the run.

A migration the plan tuned for post-copy (no pre-copy setting converges in the
model) switches as soon as its first pass over RAM is done, as planned, without
waiting to fall behind; or, where the plan gave pre-copy a few rounds to try (a
writer whose rate is known only from below), once those rounds are done; a
burst on the link comes first where the plan allows one.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass

from hostmaint.coordinator.forecast import forecast
from hostmaint.coordinator.model import (
    DEFAULT_PARAMS,
    HostCapabilities,
    ModelParams,
    Settings,
    qemu_downtime_limit_ms,
)


class Action(enum.StrEnum):
    NONE = "none"
    RAISE_DOWNTIME = "raise_downtime"
    THROTTLE_VCPUS = "throttle_vcpus"
    HOLD_LINK = "hold_link"
    RELEASE_LINK = "release_link"
    POSTCOPY = "postcopy"
    ABORT = "abort"


@dataclass(frozen=True)
class Observation:
    """One progress sample of a running migration."""

    elapsed_s: float
    iteration: int
    remaining_bytes: int
    bandwidth_bytes_per_s: float
    max_downtime_ms: int
    postcopy: bool = False
    # QEMU's dirty-bitmap sync count (libvirt's memory_iteration) is 1 through the first
    # pass over RAM and 2 after it; False where no such count is known
    first_pass_done: bool = False
    # the link over the migrations running (some may not send yet): the least bandwidth it
    # can count on once they all do; 0 where not known
    fair_share_bytes_per_s: float = 0.0
    # another migration of the drain holds the link (this one is capped to a trickle)
    held_back: bool = False
    # the bytes QEMU has sent so far (0: not known)
    processed_bytes: int = 0


@dataclass(frozen=True)
class Limits:
    predicted_total_s: float
    qemu_downtime_cap_ms: int  # the most the operator's limit allows QEMU, alone on the link
    allow_postcopy: bool
    postcopy_permitted: bool  # the migration was started with post-copy allowed
    cpu_bound: bool  # throttling the vCPUs slows its writer
    stall_factor: float = 1.5
    stall_grace_s: float = 10.0
    settle_s: float = 8.0  # time a step gets before the next
    throttle_steps_pct: tuple[int, ...] = (40, 70, 90)
    operator_cap_ms: float = 0.0  # the real downtime allowed; 0: use qemu_downtime_cap_ms as is
    link_bytes_per_s: float = 0.0  # the most one migration can get (the link's payload rate)
    params: ModelParams = DEFAULT_PARAMS
    postcopy_after_first_pass: bool = False  # the plan's post-copy tuning
    precopy_tries: int = 0  # rounds after the first pass before that switch
    # how long the migration may hold the link for its switch-over (0: never); the plan
    # allows it to a VM that converges alone on the whole link with the whole link's limit
    burst_s: float = 0.0


@dataclass(frozen=True)
class Pacing:
    """The ladder's pace, as the coordinator is configured (``[drain]``): when a migration
    is behind, how long a step gets before the next, and how often progress is sampled.
    The plan's simulation runs the ladder at the same pace as the drain."""

    stall_factor: float = Limits.stall_factor
    stall_grace_s: float = Limits.stall_grace_s
    settle_s: float = Limits.settle_s
    poll_interval_s: float = 1.0


DEFAULT_PACING = Pacing()


def limits_for(
    *,
    predicted_total_s: float,
    operator_cap_ms: float,
    link_bytes_per_s: float,
    settings: Settings | None,
    allow_postcopy: bool,
    cpu_bound: bool,
    source: HostCapabilities,
    pacing: Pacing,
    params: ModelParams = DEFAULT_PARAMS,
) -> Limits:
    """One migration's ladder, for the plan's simulation and for the run alike.

    ``settings``: how the plan starts it (None: not planned, started with nothing
    permitted); ``cpu_bound``: throttling its vCPUs would slow its writer
    (``planner.throttle_helps``); ``source``: what the source host can do. A step the
    source cannot take is left out (the ladder goes on to the next): no throttle without
    its cgroup CPU controller, no post-copy without its userfaultfd (the plan permits
    post-copy only where the target has userfaultfd too).
    """
    return Limits(
        predicted_total_s=predicted_total_s,
        qemu_downtime_cap_ms=max(
            1, int(qemu_downtime_limit_ms(operator_cap_ms, link_bytes_per_s, params))
        ),
        allow_postcopy=allow_postcopy and source.postcopy,
        postcopy_permitted=settings is not None and settings.postcopy_permitted,
        cpu_bound=cpu_bound and source.vcpu_throttle,
        stall_factor=pacing.stall_factor,
        stall_grace_s=pacing.stall_grace_s,
        settle_s=pacing.settle_s,
        operator_cap_ms=operator_cap_ms,
        link_bytes_per_s=link_bytes_per_s,
        params=params,
        postcopy_after_first_pass=settings is not None and settings.postcopy_after_first_round,
        precopy_tries=settings.precopy_tries if settings is not None else 0,
        burst_s=settings.burst_s if settings is not None else 0.0,
    )


@dataclass(frozen=True)
class Escalation:
    """What has been done so far to this migration."""

    level_at_s: float = -1e9
    downtime_raised: bool = False
    throttle_pct: int = 0
    postcopy: bool = False
    aborted: bool = False
    postcopy_failed: bool = False  # the switch was refused: abort is the next step
    burst: bool = False  # it held the link once (or the attempt failed)
    holding: bool = False  # it holds the link now
    restore_ms: int = 0  # its QEMU limit before the burst, restored at the release
    after_burst: bool = False  # the last step was a burst that did not converge


@dataclass(frozen=True)
class Decision:
    action: Action
    value: int = 0
    reason: str = ""
    restore_ms: int = 0  # HOLD_LINK: the limit to restore at the release


def behind(history: Sequence[Observation], limits: Limits) -> str:
    """Why the migration is behind, or "" when it is not."""
    if not history:
        return ""
    now = history[-1]
    if now.postcopy:
        return ""
    # Its own rounds, once they show it will not converge: behind now, not at a timeout.
    seen = forecast(history, limits.params)
    if seen is not None and not seen.converges:
        return seen.reason
    allowed = limits.predicted_total_s * limits.stall_factor + limits.stall_grace_s
    if now.elapsed_s > allowed:
        return f"elapsed {now.elapsed_s:.0f}s > {allowed:.0f}s allowed by the prediction"
    # No progress: several rounds with the remaining bytes not shrinking. Only samples
    # that say what remains count: a cloud's record may not (0), and so many samples of
    # nothing known are no stall (a migration adopted after a restart and followed
    # through the cloud would read as one from its first polls).
    recent = [o for o in history if o.iteration >= 3 and o.remaining_bytes > 0]
    if len(recent) >= 6 and recent[-1].elapsed_s - recent[0].elapsed_s >= limits.settle_s:
        best_before = min(o.remaining_bytes for o in recent[: len(recent) // 2])
        best_after = min(o.remaining_bytes for o in recent[len(recent) // 2 :])
        if best_after >= best_before * 0.95:
            return f"no progress over {recent[-1].elapsed_s - recent[0].elapsed_s:.0f}s"
    return ""


def next_step(history: Sequence[Observation], limits: Limits, done: Escalation) -> Decision:
    if not history or done.aborted or done.postcopy:
        return Decision(Action.NONE)
    now = history[-1]
    if done.holding:
        # what is left fits the limit: it is switching over, and a release now would cut
        # its bandwidth during the final copy; it gets one more burst's time for that
        fits = now.remaining_bytes * 1000.0 <= now.bandwidth_bytes_per_s * now.max_downtime_ms
        window_s = limits.burst_s * (2.0 if fits else 1.0)
        if now.elapsed_s - done.level_at_s < window_s:
            return Decision(Action.NONE)
        why = f"not converged after holding the link for {limits.burst_s:.1f}s"
        return Decision(Action.RELEASE_LINK, done.restore_ms, why)
    if now.held_back:
        return Decision(Action.NONE)
    postcopy_ok = limits.allow_postcopy and limits.postcopy_permitted and not done.postcopy_failed
    if limits.postcopy_after_first_pass and postcopy_ok and now.first_pass_done:
        spent = now.iteration >= 2 + limits.precopy_tries
        seen = None if spent else forecast(history, limits.params)
        if not now.postcopy and (spent or (seen is not None and not seen.converges)):
            why = _planned_switch(limits.precopy_tries, "" if seen is None else seen.reason)
            return _burst(now, limits, done, why) or Decision(Action.POSTCOPY, 0, why)
    if not done.after_burst and now.elapsed_s - done.level_at_s < limits.settle_s:
        return Decision(Action.NONE)
    why = behind(history, limits)
    if not why:
        return Decision(Action.NONE)
    raise_to = raised_downtime_ms(now, limits)
    if not done.downtime_raised and now.max_downtime_ms < raise_to:
        return Decision(Action.RAISE_DOWNTIME, raise_to, why)
    if limits.cpu_bound:
        for step in limits.throttle_steps_pct:
            if step > done.throttle_pct:
                return Decision(Action.THROTTLE_VCPUS, step, why)
    last = Decision(Action.POSTCOPY, 0, why) if postcopy_ok else Decision(Action.ABORT, 0, why)
    return _burst(now, limits, done, why) or last


def _burst(now: Observation, limits: Limits, done: Escalation, why: str) -> Decision | None:
    """Hold the link for the switch-over, where the plan allows it and the link is shared."""
    shared = 0 < now.fair_share_bytes_per_s < 0.99 * limits.link_bytes_per_s
    if limits.burst_s <= 0 or done.burst or not now.first_pass_done or not shared:
        return None
    return Decision(
        Action.HOLD_LINK,
        limits.qemu_downtime_cap_ms,
        f"{why}; holding the link for the switch-over",
        restore_ms=now.max_downtime_ms,
    )


def _planned_switch(tries: int, stuck: str = "") -> str:
    if stuck:
        return f"planned: post-copy, before its {tries} pre-copy rounds: {stuck}"
    if tries <= 0:
        return "planned: post-copy after the first pass"
    return f"planned: post-copy, pre-copy did not converge in {tries} rounds after the first pass"


def raised_downtime_ms(now: Observation, limits: Limits) -> int:
    """QEMU's limit keeping the real downtime under the operator's at the current bandwidth.

    QEMU switches over when what is left fits its limit at the bandwidth it measures, so
    the final copy takes the limit only if that bandwidth holds. A migration sharing the
    link may measure up to the whole link at the switch-over decision (its neighbours
    pause sending: set-up, zero-page scans) and get only its fair share for the final
    copy: its limit is for that drop (the dispatcher holds new starts while it runs).
    """
    if not limits.operator_cap_ms or now.bandwidth_bytes_per_s <= 0:
        return limits.qemu_downtime_cap_ms
    worst = now.bandwidth_bytes_per_s
    if now.fair_share_bytes_per_s > 0:
        worst = min(worst, now.fair_share_bytes_per_s)
    best = now.bandwidth_bytes_per_s
    if worst < limits.link_bytes_per_s:  # sharing: the neighbours may pause
        best = max(best, limits.link_bytes_per_s)
    at_now = qemu_downtime_limit_ms(limits.operator_cap_ms, best, limits.params, worst)
    return max(1, min(limits.qemu_downtime_cap_ms, int(at_now)))


def applied(done: Escalation, decision: Decision, at_s: float, ok: bool = True) -> Escalation:
    """The escalation state after carrying out a decision (``ok``: its call succeeded).

    A failed step counts as taken, so the ladder moves on; but a refused post-copy
    switch leaves the migration in pre-copy, where abort is the next step, and a burst
    that could not hold the link leaves nothing to release.
    """
    a = decision.action
    if a is Action.NONE:
        return done
    if a is Action.RELEASE_LINK:
        return dataclasses.replace(
            done, level_at_s=at_s, holding=False, restore_ms=0, after_burst=True
        )
    return Escalation(
        level_at_s=at_s,
        downtime_raised=done.downtime_raised or a is Action.RAISE_DOWNTIME,
        throttle_pct=decision.value if a is Action.THROTTLE_VCPUS else done.throttle_pct,
        postcopy=done.postcopy or (a is Action.POSTCOPY and ok),
        aborted=done.aborted or a is Action.ABORT,
        postcopy_failed=done.postcopy_failed or (a is Action.POSTCOPY and not ok),
        burst=done.burst or a is Action.HOLD_LINK,
        holding=a is Action.HOLD_LINK and ok,
        restore_ms=decision.restore_ms if a is Action.HOLD_LINK and ok else 0,
    )
