"""Convergence model of QEMU pre-copy live migration: one migration simulated (pure: no
I/O, no clock). The values it runs on (``VmSpec``, ``Settings``, ``ModelParams``, ...)
are ``model``'s.

Public API
----------
  ``predict(vm, link, policy, params=DEFAULT_PARAMS) -> Prediction``
      the cheapest tuning that converges within the VM's downtime cap, tried in
      order: none, raise_downtime, auto_converge (writers not known to be paced; an
      unknown writer is predicted as paced: throttling slows it only once the CPU left
      cannot sustain its rate),
      postcopy (only if the policy allows it), else cannot_converge.
  ``predict_at(vm, bandwidth, policy, params)``: ``predict`` at a given payload bandwidth;
  ``candidate_settings(vm, bandwidth, policy, params)``: the tunings it tries.
  ``run_alone(vm, bandwidth_bytes_per_s, settings, params) -> Migration``
      one migration simulated alone at a constant bandwidth (a finished ``Migration``).

``Migration`` is the mutable state machine of one migration used by both
``predict`` and the drain simulator, so both share exactly the same physics:

* round 1 sends every non-zero page, the static data first and the working set last
  (the copy walks RAM upwards), then scans the zero pages at ``zero_scan_bytes_per_s``
  (CPU-bound, no bandwidth; each costs ``zero_page_cost_fraction`` of a page on the link);
  every later round sends the pages dirtied behind the copy cursor during the previous one;
* a write to a page the round has not sent yet is free (the page goes once); a write to a
  working-set page outside the round, or behind the cursor, is resent next round: behind
  the cursor lands ``behind_write_factor`` of a uniformly placed writer's share (a writer
  walking in the copy's direction stays ahead of it; fitted), at least ``rate - bw`` for
  a writer that laps the cursor, and all of it during the zero tail; at most the part of
  the working set not waiting to be sent;
* so a round that ends on zero pages leaves only what was dirtied behind the cursor for
  the switch-over: the real downtime is that over the bandwidth, plus the device state
  and the fixed ``switchover_ms`` (fitted to the lab with ``calibrate --fit``);
* QEMU syncs the dirty bitmap when what is left of the round drops below
  ``threshold = bandwidth * downtime_limit`` (checked every iteration of at most
  ``iteration_s``), then completes when ``pending < threshold``;
* auto-converge: at a sync at least ``throttle_period_s`` after the previous
  period, if the bytes dirtied in the period exceed ``trigger_pct`` % of the bytes
  sent in it, a counter is bumped; at 2 the counter resets and the vCPU throttle
  starts at ``throttle_initial_pct`` or rises by ``throttle_increment_pct`` (max 99);
  a CPU-bound writer slows to ``rate * (1 - throttle)``, a paced writer only when
  the CPU left cannot sustain its rate (``cpu_max_dirty_bytes_per_s * (1 - throttle)``);
* switch-over: the guest pauses, the pending pages and the device state are sent at
  the current bandwidth, plus a fixed ``switchover_ms``: that is the real downtime;
* post-copy: a pause for the device state, then the rest is pulled while the guest
  runs on the target (always finishes; counted, because a network fault loses the VM).
"""

from __future__ import annotations

import math

from hostmaint.coordinator.model import (
    DEFAULT_PARAMS,
    DrainPolicy,
    Link,
    ModelParams,
    Outcome,
    Phase,
    Prediction,
    Settings,
    Tuning,
    VmSpec,
    WriterKind,
    effective_bandwidth,
    first_round_bytes,
    qemu_downtime_limit_ms,
    zero_scan_s,
)

_EPS_S = 1e-9
_EPS_BYTES = 1.0


class Migration:
    """One migration's state; advanced by ``advance`` and ``fire`` at a given bandwidth."""

    def __init__(
        self,
        vm: VmSpec,
        settings: Settings,
        params: ModelParams = DEFAULT_PARAMS,
        start_s: float = 0.0,
        setup_s: float | None = None,
    ) -> None:
        self.vm = vm
        self.params = params
        self.settings = settings
        self.downtime_limit_ms = settings.downtime_limit_ms
        self.bandwidth_cap = settings.max_bandwidth_bytes_per_s
        self.start_s = start_s
        self.now_s = start_s
        self.end_s: float | None = None
        self.phase = Phase.SETUP
        self.outcome = Outcome.RUNNING
        self.phase_fixed_s = params.setup_s if setup_s is None else setup_s
        self.phase_bytes = 0.0
        self.working_set = float(max(1, vm.working_set_estimate_bytes))
        self.first_round_bytes = first_round_bytes(vm, params)
        self.zero_scan_s = zero_scan_s(vm, params)  # round 1's tail of zero pages
        self.remaining = 0.0  # link bytes left in the current pre-copy round
        self.new_dirty = 0.0  # unique bytes dirtied behind the copy cursor since the last sync
        self.round_ws = self.working_set  # working-set bytes the current round sends
        self.rounds = 0
        self.throttle_pct = 0.0
        self.high_cnt = 0
        self.period_start_s = start_s
        self.period_dirty = 0.0
        self.period_sent = 0.0
        self.bytes_sent = 0.0
        self.paused_at_s: float | None = None
        self.downtime_s = 0.0
        self.postcopy = False
        self.pending_at_sync: list[float] = []
        self.min_pending = math.inf
        self.last_progress_s = start_s

    # -- the guest ---------------------------------------------------------
    def dirty_rate(self) -> float:
        if self.paused_at_s is not None or self.phase not in (Phase.SETUP, Phase.PRECOPY):
            return 0.0
        rate = self.vm.dirty_rate_bytes_per_s
        run = 1.0 - self.throttle_pct / 100.0
        if self.vm.writer is WriterKind.CPU:
            return rate * run
        return min(rate, self.params.cpu_max_dirty_bytes_per_s * run)

    # -- bandwidth ---------------------------------------------------------
    def wants_bandwidth(self) -> bool:
        if self.phase is Phase.PRECOPY:
            return not self._in_zero_tail()
        return self.phase_bytes > _EPS_BYTES

    def _in_zero_tail(self) -> bool:
        """Round 1 has sent its non-zero pages and is scanning the zero pages after them."""
        return self.rounds == 1 and self.remaining <= _EPS_BYTES and self.zero_scan_s > _EPS_S

    def threshold(self, bw: float) -> float:
        return bw * self.downtime_limit_ms / 1000.0

    def _sync_level(self, bw: float) -> float:
        return max(0.0, self.threshold(bw) - bw * self.params.iteration_s / 2.0)

    def time_to_event(self, bw: float) -> float:
        """Seconds until this migration's next own event at bandwidth ``bw``."""
        if self.phase in (Phase.DONE, Phase.ABORTED):
            return math.inf
        if self.phase is Phase.PRECOPY:
            if self._in_zero_tail():
                return self.zero_scan_s
            if bw <= 0.0:
                return math.inf
            if self.rounds == 1 and self.zero_scan_s > _EPS_S:
                return self.remaining / bw  # then the zero tail, then the sync
            return max(0.0, (self.remaining - self._sync_level(bw)) / bw)
        if self.phase_bytes > _EPS_BYTES:
            return math.inf if bw <= 0.0 else self.phase_bytes / bw
        return max(0.0, self.phase_fixed_s)

    def advance(self, dt: float, bw: float) -> None:
        if dt <= 0.0 or self.phase in (Phase.DONE, Phase.ABORTED):
            return
        self.now_s += dt
        if self.phase is Phase.PRECOPY:
            if self._in_zero_tail():
                self._dirty_behind(dt, 0.0)  # remaining is 0: every write is behind
                self.zero_scan_s -= dt
                return
            self._dirty_behind(dt, bw)
            sent = min(self.remaining, bw * dt)
            self.remaining -= sent
            self._sent(sent)
        elif self.phase_bytes > _EPS_BYTES:
            sent = min(self.phase_bytes, bw * dt)
            self.phase_bytes -= sent
            self._sent(sent)
        else:
            self.phase_fixed_s -= dt

    def _sent(self, sent: float) -> None:
        self.bytes_sent += sent
        self.period_sent += sent

    # -- events ------------------------------------------------------------
    def fire(self, bw: float) -> None:
        """Handle the event that ``time_to_event`` said is due now."""
        if self.phase is Phase.PRECOPY:
            if self.rounds == 1 and self.zero_scan_s > _EPS_S:
                return  # the non-zero pages are out: the zero tail comes before the sync
            self._sync(bw)
            return
        if self.phase_bytes > _EPS_BYTES:
            return
        self.phase_bytes = 0.0
        if self.phase_fixed_s > _EPS_S:
            return
        if self.phase is Phase.SETUP:
            self.phase = Phase.PRECOPY
            self.remaining = self.first_round_bytes
            self.rounds = 1
            self.new_dirty = 0.0
            self.period_start_s = self.now_s
            self.last_progress_s = self.now_s
        elif self.phase is Phase.SWITCHOVER:
            self._finish()
        elif self.phase is Phase.POSTCOPY_SWITCH:
            assert self.paused_at_s is not None
            self.downtime_s = self.now_s - self.paused_at_s
            self.paused_at_s = None
            self.phase = Phase.POSTCOPY
            self.phase_bytes = self.remaining
            self.phase_fixed_s = self.params.finish_s
        elif self.phase in (Phase.POSTCOPY, Phase.FINISH):
            self.phase = Phase.DONE
            self.outcome = Outcome.COMPLETED
            self.end_s = self.now_s

    def _dirty_behind(self, dt: float, bw: float) -> None:
        """Add the unique bytes the guest dirties in ``dt`` that the next round must resend.

        The copy walks RAM upwards; the working set ``W`` sits above the static data, so the
        working-set pages of the round (``round_ws``: all of ``W`` in round 1, the pages
        dirtied in the previous round later) are the last ones it sends, and the unsent part
        of them is ``min(round_ws, remaining)``. A write lands anywhere in ``W``:

        * on a page the round has not sent yet: free, the page goes once with its new content;
        * on a working-set page outside the round: resent next round;
        * on a page the round already sent (behind the cursor): resent, but a writer walking
          its working set in the copy's direction mostly stays on one side of the cursor, so
          only ``behind_write_factor`` of the uniform share lands there (fitted to the lab);
          a writer faster than the cursor laps it: at least ``rate - bw`` lands behind;
        * while round 1 scans its zero pages the cursor is past all of ``W``.

        The resend is at most the part of ``W`` not waiting to be sent this round.
        """
        rate = self.dirty_rate()
        if rate <= 0.0 or dt <= 0.0:
            return
        ws = self.working_set
        in_round = min(ws, self.round_ws)
        r0 = self.remaining
        outside = (ws - in_round) / ws
        if bw <= 0.0:  # the zero tail (nothing left to send), or a link with no share
            behind = rate * dt * (1.0 if r0 < _EPS_BYTES else outside)
        else:
            free_s = min(dt, max(0.0, (r0 - in_round) / bw))  # the cursor before the ws pages
            span = dt - free_s
            u1 = min(in_round, r0)
            u2 = max(0.0, u1 - bw * span)
            sent_share = span * (in_round - (u1 + u2) / 2.0) / ws
            uniform = rate * (dt * outside + sent_share * self.params.behind_write_factor)
            lapping = max(0.0, rate - bw) * span
            behind = max(lapping, uniform)
        cap = ws - min(in_round, max(0.0, r0 - bw * dt))
        self.new_dirty = min(cap, self.new_dirty + behind)

    def _sync(self, bw: float) -> None:
        new = self.new_dirty
        pending = self.remaining + new
        self.new_dirty = 0.0
        self.period_dirty += new
        if self.settings.auto_converge and self.now_s - self.period_start_s >= (
            self.params.throttle_period_s
        ):
            limit = self.period_sent * self.params.throttle_trigger_pct / 100.0
            if self.period_dirty > limit:
                self.high_cnt += 1
                if self.high_cnt >= 2:
                    self.high_cnt = 0
                    self._throttle_up()
            self.period_start_s = self.now_s
            self.period_dirty = 0.0
            self.period_sent = 0.0
        self.pending_at_sync.append(pending)
        if pending < self.min_pending:
            self.min_pending = pending
            self.last_progress_s = self.now_s
        self.remaining = pending
        self.round_ws = min(self.working_set, pending)
        if pending <= 0.0 or pending < self.threshold(bw):
            self._switchover()
        elif (
            self.settings.postcopy_after_first_round
            and self.settings.postcopy_permitted
            and self.rounds > self.settings.precopy_tries
            and not self.settings.burst_s  # the ladder switches it, after its burst
        ):
            self.start_postcopy()
        else:
            self.rounds += 1

    def _throttle_up(self) -> None:
        if self.throttle_pct <= 0.0:
            self.throttle_pct = self.params.throttle_initial_pct
        else:
            self.throttle_pct = min(
                self.throttle_pct + self.params.throttle_increment_pct, self.params.throttle_max_pct
            )

    def _switchover(self) -> None:
        if self.paused_at_s is None:
            self.paused_at_s = self.now_s
        self.phase = Phase.SWITCHOVER
        self.phase_bytes = self.remaining + self.params.device_state_bytes
        self.remaining = 0.0
        self.phase_fixed_s = self.params.switchover_ms / 1000.0

    def _finish(self) -> None:
        assert self.paused_at_s is not None
        self.downtime_s = self.now_s - self.paused_at_s
        self.paused_at_s = None
        self.phase = Phase.FINISH  # clean-up on both hosts, the guest runs on the target
        self.phase_bytes = 0.0
        self.phase_fixed_s = self.params.finish_s

    # -- control from outside (executor, baselines) ------------------------
    def set_downtime_limit(self, limit_ms: float) -> None:
        self.downtime_limit_ms = min(limit_ms, self.params.qemu_max_downtime_ms)

    def start_postcopy(self) -> bool:
        if not self.settings.postcopy_permitted or self.phase is not Phase.PRECOPY:
            return False
        self.remaining += self.new_dirty
        self.new_dirty = 0.0
        self.postcopy = True
        self.paused_at_s = self.now_s
        self.phase = Phase.POSTCOPY_SWITCH
        self.phase_bytes = float(self.params.device_state_bytes)
        self.phase_fixed_s = self.params.switchover_ms / 1000.0
        return True

    def throttle_vcpus(self, pct: float) -> None:
        """The agent's vCPU throttle: the guest runs at most ``100 - pct`` % of the time."""
        self.throttle_pct = min(max(self.throttle_pct, pct), self.params.throttle_max_pct)

    def pause(self) -> None:
        """Nova's force-complete without post-copy: the guest stops dirtying."""
        if self.phase is Phase.PRECOPY and self.paused_at_s is None:
            self.paused_at_s = self.now_s

    def abort(self) -> None:
        if self.phase in (Phase.SETUP, Phase.PRECOPY):
            self.phase = Phase.ABORTED
            self.outcome = Outcome.ABORTED
            self.paused_at_s = None
            self.end_s = self.now_s

    @property
    def in_precopy(self) -> bool:
        return self.phase in (Phase.SETUP, Phase.PRECOPY)

    @property
    def finished(self) -> bool:
        return self.phase in (Phase.DONE, Phase.ABORTED)


def run_alone(
    vm: VmSpec,
    bandwidth_bytes_per_s: float,
    settings: Settings,
    params: ModelParams = DEFAULT_PARAMS,
    max_bytes_factor: float | None = None,
) -> Migration:
    """Simulate one migration alone at a constant bandwidth until done or the horizon.

    With ``max_bytes_factor``, a pre-copy that has sent more than that many times its first
    round counts as not converging (it would in time, but slower than is worth waiting).
    """
    mig = Migration(vm, settings, params)
    bw = bandwidth_bytes_per_s
    if settings.max_bandwidth_bytes_per_s is not None:
        bw = min(bw, settings.max_bandwidth_bytes_per_s)
    while not mig.finished:
        too_much = max_bytes_factor is not None and (
            mig.bytes_sent > max_bytes_factor * mig.first_round_bytes
        )
        if too_much and not mig.postcopy:
            mig.outcome = Outcome.NOT_CONVERGED
            break
        if mig.now_s - mig.start_s > params.horizon_s or mig.rounds > params.max_rounds:
            mig.outcome = Outcome.NOT_CONVERGED
            break
        dt = mig.time_to_event(bw)
        if math.isinf(dt):
            mig.outcome = Outcome.NOT_CONVERGED
            break
        mig.advance(dt, bw)
        mig.fire(bw)
        if _stalled(mig):
            mig.outcome = Outcome.NOT_CONVERGED
            break
    return mig


def _stalled(mig: Migration) -> bool:
    """Pre-copy no longer progresses: throttle at its top and pending not shrinking."""
    p = mig.pending_at_sync
    if mig.phase is not Phase.PRECOPY or len(p) < 12:
        return False
    throttle_can_rise = (
        mig.settings.auto_converge and mig.throttle_pct < mig.params.throttle_max_pct
    )
    if throttle_can_rise:
        return False
    return p[-1] >= 0.999 * p[-6] and p[-6] >= 0.999 * p[-11]


def _prediction(mig: Migration, tuning: Tuning, untuned: bool) -> Prediction:
    done = mig.outcome is Outcome.COMPLETED
    total = (mig.end_s - mig.start_s) if (done and mig.end_s is not None) else math.inf
    return Prediction(
        tuning=tuning if done else Tuning.CANNOT_CONVERGE,
        converges=done,
        converges_untuned=untuned,
        total_s=total,
        downtime_ms=mig.downtime_s * 1000.0 if done else math.inf,
        rounds=mig.rounds,
        bytes_sent=mig.bytes_sent,
        qemu_downtime_limit_ms=mig.settings.downtime_limit_ms,
        settings=mig.settings,
        final_throttle_pct=mig.throttle_pct,
    )


def candidate_settings(
    vm: VmSpec, bw: float, policy: DrainPolicy, params: ModelParams = DEFAULT_PARAMS
) -> list[tuple[Tuning, Settings]]:
    """The tunings ``predict`` tries, cheapest first, with their start settings."""
    top = qemu_downtime_limit_ms(policy.downtime_cap_ms(vm.max_downtime_ms), bw, params)
    base = min(params.qemu_default_downtime_ms, top)
    out = [(Tuning.NONE, Settings(downtime_limit_ms=base))]
    if top > base:
        out.append((Tuning.RAISE_DOWNTIME, Settings(downtime_limit_ms=top)))
    if policy.allow_auto_converge and vm.writer is not WriterKind.PACED:
        out.append((Tuning.AUTO_CONVERGE, Settings(downtime_limit_ms=top, auto_converge=True)))
    if policy.allow_postcopy:
        post = Settings(top, postcopy_permitted=True, postcopy_after_first_round=True)
        out.append((Tuning.POSTCOPY, post))
    return out


def predict_at(
    vm: VmSpec, bw: float, policy: DrainPolicy, params: ModelParams = DEFAULT_PARAMS
) -> Prediction:
    """``predict`` at an explicit payload bandwidth (bytes/s)."""
    cands = candidate_settings(vm, bw, policy, params)
    untuned = False
    last: Migration | None = None
    for i, (tuning, settings) in enumerate(cands):
        mig = run_alone(vm, bw, settings, params, params.max_precopy_bytes_factor)
        if i == 0:
            untuned = mig.outcome is Outcome.COMPLETED
        last = mig
        if mig.outcome is Outcome.COMPLETED:
            return _prediction(mig, tuning, untuned)
    assert last is not None
    return _prediction(last, Tuning.CANNOT_CONVERGE, untuned)


def predict(
    vm: VmSpec, link: Link, policy: DrainPolicy, params: ModelParams = DEFAULT_PARAMS
) -> Prediction:
    """Predict the migration of ``vm`` alone on ``link`` and its cheapest converging tuning."""
    return predict_at(vm, effective_bandwidth(link, params), policy, params)
