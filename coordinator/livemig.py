"""One live migration: start it, follow it, escalate when it falls behind, settle its end.

The source agent's WatchMigration is the close view and drives the escalation
ladder; when the agent cannot watch (down, restarting, or a hypervisor without
job statistics) the cloud's migration record is polled instead, and the agent
is re-attached once it is back. The ladder's actions go to the source agent
(downtime, vCPU throttle, the link arbiter's bursts) or to the cloud (post-copy,
abort), each a journaled step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from hostmaint.coordinator import errors, escalation, pcrecovery
from hostmaint.coordinator.drivers.base import (
    DriverError,
    LiveMigrationOptions,
    MigrationRef,
    MigrationState,
)
from hostmaint.coordinator.forecast import forecast
from hostmaint.coordinator.journal import VmRow
from hostmaint.coordinator.outcomes import Outcomes
from hostmaint.coordinator.runtime import DrainRun, Runtime
from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import coordinator_pb2 as cpb

LOG = logging.getLogger(__name__)
WATCH_DEADLINE_S = 6 * 3600.0
_SETTLE_AFTER_WATCH_S = 120.0
_HISTORY_KEPT = 600


@dataclass
class _Watch:
    """What the executor knows of one migration while it follows it."""

    limits: escalation.Limits
    started: float
    history: list[escalation.Observation] = field(default_factory=list)
    done: escalation.Escalation = field(default_factory=escalation.Escalation)
    downtime_ms: float = 0.0
    final_phase: int = apb.MIGRATION_PHASE_UNSPECIFIED
    error: str = ""
    finished: bool = False
    plan_applied: bool = False  # the planned QEMU downtime limit is in force on the job
    # the guest runs on the target already (post-copy): nothing may abort it any more
    postcopy_seen: bool = False
    pause: pcrecovery.Pause | None = None  # its post-copy broke and is being resumed
    revised_from: int = 0  # the round start its journaled revised prediction read


def observation_of(
    p: apb.MigrationProgress,
    elapsed_s: float,
    *,
    fair_share_bytes_per_s: float = 0.0,
    held_back: bool = False,
) -> escalation.Observation:
    """An agent's progress sample as the ladder and the forecast read it."""
    return escalation.Observation(
        elapsed_s=elapsed_s,
        iteration=p.iteration,
        remaining_bytes=p.memory_remaining_bytes,
        bandwidth_bytes_per_s=p.bandwidth_bytes_per_s,
        max_downtime_ms=p.max_downtime_ms,
        postcopy=p.phase == apb.MIGRATION_PHASE_POSTCOPY,
        first_pass_done=p.iteration >= 2,
        fair_share_bytes_per_s=fair_share_bytes_per_s,
        held_back=held_back,
        processed_bytes=p.memory_processed_bytes,
    )


@dataclass(frozen=True)
class Followed:
    """How a followed migration ended."""

    completed: bool
    downtime_ms: float
    error: str
    # its post-copy broke for good: the error says where the VM's halves are
    stranded: bool = False


class LiveMigrations:
    def __init__(self, rt: Runtime, outcomes: Outcomes) -> None:
        self.rt = rt
        self.outcomes = outcomes
        self.recovery = pcrecovery.PostcopyRecovery(rt)

    def start(self, run: DrainRun, row: VmRow) -> MigrationRef | None:
        """Journals the intent and starts the migration; a refusal is retried or failed."""
        rt = self.rt
        target = row.target_host or row.planned_target or None
        options = self._options(run, row, target)
        detail: dict[str, object] = {
            "attempt": row.attempts + 1,
            "target": target or "",
            "options": options.describe(),
        }
        started = rt.start_step(
            run,
            "start_migration",
            row,
            detail,
            lambda: rt.driver.start_live_migration(row.vm_uuid, target, None, options=options),
        )
        if started.ref is None:
            # An attempt too: a cloud that keeps failing must not be asked forever.
            self.outcomes.retry_or_fail(run, row, started.error, target, count_attempt=True)
            return None
        self.outcomes.started(run, row, started.ref, target)
        return started.ref

    def _options(self, run: DrainRun, row: VmRow, target: str | None) -> LiveMigrationOptions:
        planned = run.planned.get(row.vm_uuid)
        addresses = self.rt.settings.migration_addresses or {}
        if planned is None:
            return LiveMigrationOptions(migration_uri=addresses.get(target or "", ""))
        s = planned.settings
        return LiveMigrationOptions(
            max_downtime_ms=round(s.downtime_limit_ms),
            auto_converge=s.auto_converge,
            allow_postcopy=s.postcopy_permitted,
            bandwidth_bytes_per_s=round(s.max_bandwidth_bytes_per_s or 0),
            migration_uri=addresses.get(target or "", ""),
        )

    def follow(
        self,
        run: DrainRun,
        row: VmRow,
        ref: MigrationRef,
        done: escalation.Escalation | None = None,
    ) -> Followed:
        """Follows the migration to its end (escalating from `done`, for a migration
        adopted after a restart)."""
        rt = self.rt
        w = _Watch(run.limits(row, rt.settings.pacing, rt.params), row.started_at or rt.clock())
        run.in_postcopy.discard(row.vm_uuid)  # an attempt starts in pre-copy
        if done is not None:
            w.done = done
        while not rt.stopped.is_set():
            try:
                row = self._watch_agent(run, row, ref, w)
                break
            except errors.AgentRefused as e:
                LOG.info("agent cannot watch, following the cloud vm=%s reason=%s", row.vm_uuid, e)
                row = self._watch_cloud(run, row, ref, w, reattach=False)
                break
            except errors.AgentUnavailable as e:
                LOG.warning("agent watch lost, following the cloud vm=%s reason=%s", row.vm_uuid, e)
                row = self._watch_cloud(run, row, ref, w, reattach=True)
                if w.finished:
                    break
        run.link.end(row.vm_uuid)  # before the cloud's record settles
        if rt.stopped.is_set():
            return Followed(False, 0.0, "coordinator stopping")
        if w.pause is not None and w.pause.stranded:
            return Followed(False, 0.0, w.pause.stranded, stranded=True)
        if (
            w.pause is not None
            and w.pause.active
            and w.final_phase != apb.MIGRATION_PHASE_COMPLETED
        ):
            # The watch ended while the post-copy looked paused: where the VM runs is the
            # truth (a resume that waited out the cut may end its call with an error after
            # the post-copy completed); otherwise it is never a failure to retry.
            if self._moved(ref):
                LOG.warning("paused post-copy ended on its target vm=%s", row.vm_uuid)
                self.recovery.resumed(run, row, w.pause)
                return Followed(True, w.downtime_ms, "")
            target = row.target_host or "the target"
            why = w.error or "the watch ended while it was paused"
            return Followed(
                False,
                0.0,
                f"post-copy to {target} broke and was not resumed ({why}). "
                + pcrecovery.halves(row.name, run.host, target, w.pause.half),
                stranded=True,
            )
        state = self._settle(ref, row.vm_uuid)
        if w.done.throttle_pct:
            self.outcomes.unthrottle(run, row)
        if state is MigrationState.COMPLETED:
            return Followed(True, w.downtime_ms, "")
        if w.final_phase == apb.MIGRATION_PHASE_COMPLETED and state is MigrationState.UNKNOWN:
            return Followed(True, w.downtime_ms, "")
        return Followed(False, w.downtime_ms, w.error or f"migration {state}")

    def _watch_agent(self, run: DrainRun, row: VmRow, ref: MigrationRef, w: _Watch) -> VmRow:
        rt = self.rt
        agent = rt.registry.client(run.host)
        for p in agent.watch(
            row.vm_uuid,
            rt.settings.poll_interval_s,
            rt.settings.watch_start_timeout_s,
            WATCH_DEADLINE_S,
        ):
            if p.phase == apb.MIGRATION_PHASE_POSTCOPY_PAUSED:
                self._postcopy_seen(run, row, w)
                row, w.pause = self.recovery.paused(run, row, ref, w.pause, p)
                if w.pause.stranded:
                    w.finished = True
                    return row
                if rt.stopped.is_set():
                    return row
                continue
            if (
                w.pause is not None
                and w.pause.active
                and (not p.final or p.phase == apb.MIGRATION_PHASE_COMPLETED)
            ):
                row = self.recovery.resumed(run, row, w.pause)
            if p.final:
                w.downtime_ms, w.final_phase, w.error = float(p.downtime_ms), p.phase, p.error
                w.finished = True
                return row
            if p.phase == apb.MIGRATION_PHASE_POSTCOPY:
                self._postcopy_seen(run, row, w)
            if not w.plan_applied and p.memory_total_bytes:
                w.plan_applied = True
                self._apply_planned_downtime(run, row, p.max_downtime_ms)
            obs = observation_of(
                p,
                rt.clock() - w.started,
                fair_share_bytes_per_s=self._fair_share(run),
                held_back=run.link.held_back(row.vm_uuid),
            )
            row = self._observe(run, row, ref, w, obs, p)
            if rt.stopped.is_set():
                return row
        w.finished = True
        return row

    def _fair_share(self, run: DrainRun) -> float:
        """The link over this drain's running migrations (some may still be setting up)."""
        running = len(run.threads.alive())
        return run.link_bytes_per_s * self.rt.params.link_efficiency / max(1, running)

    def _apply_planned_downtime(self, run: DrainRun, row: VmRow, current_ms: int) -> None:
        """The plan's QEMU downtime limit on a job the cloud started with its own.

        The libvirt driver starts jobs with it; Nova starts them at its first
        downtime step, so the source agent raises it (and holds it against Nova's
        next steps).
        """
        want = run.planned_limit_ms(row.vm_uuid)
        if want <= current_ms:
            return
        try:
            self.rt.registry.client(run.host).tune(
                apb.TuneMigrationRequest(domain_uuid=row.vm_uuid, max_downtime_ms=want)
            )
        except errors.CoordinatorError as e:
            LOG.warning("planned downtime not applied vm=%s error=%s", row.vm_uuid, e)
            return
        LOG.info(
            "planned downtime applied vm=%s from_ms=%d to_ms=%d", row.vm_uuid, current_ms, want
        )
        self.rt.publish(
            run, cpb.DRAIN_EVENT_KIND_TUNED, vm=row, message=f"planned max downtime {want} ms"
        )

    def _watch_cloud(
        self, run: DrainRun, row: VmRow, ref: MigrationRef, w: _Watch, reattach: bool
    ) -> VmRow:
        """Polls the cloud's record until the migration ends (or the agent is back)."""
        rt = self.rt
        polls = 0
        for status in rt.statuses(ref, row.vm_uuid):
            if status is not None and status.state.finished:
                w.finished = True
                return row
            if status is not None and status.state is MigrationState.RUNNING:
                polls += 1
                remaining = status.memory_remaining_bytes or 0
                obs = escalation.Observation(
                    elapsed_s=rt.clock() - w.started,
                    iteration=polls,
                    remaining_bytes=remaining,
                    bandwidth_bytes_per_s=0.0,
                    max_downtime_ms=0,
                    held_back=run.link.held_back(row.vm_uuid),
                )
                progress = apb.MigrationProgress(
                    domain_uuid=row.vm_uuid,
                    phase=apb.MIGRATION_PHASE_PRECOPY,
                    memory_total_bytes=status.memory_total_bytes or 0,
                    memory_processed_bytes=status.memory_processed_bytes or 0,
                    memory_remaining_bytes=remaining,
                    elapsed_ms=int(obs.elapsed_s * 1000),
                )
                row = self._observe(run, row, ref, w, obs, progress)
            if reattach and polls % 5 == 4 and rt.registry.client(run.host).health() == "SERVING":
                return row
        return row

    def _observe(
        self,
        run: DrainRun,
        row: VmRow,
        ref: MigrationRef,
        w: _Watch,
        obs: escalation.Observation,
        progress: apb.MigrationProgress,
    ) -> VmRow:
        w.history.append(obs)
        del w.history[:-_HISTORY_KEPT]
        row = self._revise(run, row, w, obs)
        self.rt.publish(run, cpb.DRAIN_EVENT_KIND_PROGRESS, vm=row, progress=progress)
        if w.postcopy_seen or (w.pause is not None and w.pause.active):
            # In post-copy the guest runs on the target: it finishes on its own, and an
            # abort would lose the guest. Whoever switched it (the ladder, Nova's monitor)
            # nothing more is done to it.
            return row
        decision = escalation.next_step(w.history, w.limits, w.done)
        if decision.action is not escalation.Action.NONE:
            row, w.done = self._escalate(run, row, ref, decision, w.done, obs.elapsed_s)
        return row

    @staticmethod
    def _postcopy_seen(run: DrainRun, row: VmRow, w: _Watch) -> None:
        w.postcopy_seen = True
        run.in_postcopy.add(row.vm_uuid)

    def _moved(self, ref: MigrationRef) -> bool:
        """Whether the cloud shows the migration completed (a few looks, a poll apart)."""
        for _ in range(3):
            try:
                if self.rt.driver.get_migration(ref).state is MigrationState.COMPLETED:
                    return True
            except DriverError as e:
                LOG.info("cannot read the migration vm=%s error=%s", ref.instance_uuid, e)
            if self.rt.stopped.wait(self.rt.settings.poll_interval_s):
                return False
        return False

    def _revise(self, run: DrainRun, row: VmRow, w: _Watch, obs: escalation.Observation) -> VmRow:
        """Journals the prediction revised from the job's own rounds, once per new round
        start they show (forecast.py)."""
        seen = forecast(w.history, w.limits.params)
        if seen is None or seen.from_iteration == w.revised_from:
            return row
        w.revised_from = seen.from_iteration
        total_s = obs.elapsed_s + seen.remaining_s if seen.converges else 0.0
        LOG.info(
            "prediction revised vm=%s total_s=%.1f planned_s=%.1f: %s",
            row.vm_uuid,
            total_s,
            row.predicted_total_s,
            seen.note,
        )
        return self.rt.journal.update_vm(
            run.drain_id, row.vm_uuid, revised_total_s=total_s, revised_note=seen.note
        )

    def _settle(self, ref: MigrationRef, vm_uuid: str) -> MigrationState:
        """The cloud's final word on the migration (it may lag the agent by a moment)."""
        deadline = self.rt.clock() + _SETTLE_AFTER_WATCH_S
        state = MigrationState.UNKNOWN
        for status in self.rt.statuses(ref, vm_uuid):
            state = status.state if status is not None else MigrationState.UNKNOWN
            if state.finished or self.rt.clock() > deadline:
                return state
        return state

    def _act(self, run: DrainRun, vm_uuid: str, ref: MigrationRef, d: escalation.Decision) -> None:
        """The ladder's step on the migration: the source agent's, the link's or the cloud's."""
        if d.action is escalation.Action.RAISE_DOWNTIME:
            self.rt.registry.client(run.host).tune(
                apb.TuneMigrationRequest(domain_uuid=vm_uuid, max_downtime_ms=d.value)
            )
        elif d.action is escalation.Action.THROTTLE_VCPUS:
            self.rt.registry.client(run.host).tune(
                apb.TuneMigrationRequest(domain_uuid=vm_uuid, vcpu_throttle_pct=d.value)
            )
        elif d.action is escalation.Action.HOLD_LINK:
            run.link.hold(vm_uuid, d.value, d.restore_ms)
        elif d.action is escalation.Action.RELEASE_LINK:
            run.link.release(vm_uuid, d.value)
        elif d.action is escalation.Action.POSTCOPY:
            self.rt.driver.force_complete(ref)
        elif d.action is escalation.Action.ABORT:
            self.rt.driver.abort(ref)

    def _escalate(
        self,
        run: DrainRun,
        row: VmRow,
        ref: MigrationRef,
        decision: escalation.Decision,
        done: escalation.Escalation,
        at_s: float,
    ) -> tuple[VmRow, escalation.Escalation]:
        rt = self.rt
        label = f"{decision.action}" + (f"={decision.value}" if decision.value else "")

        def act() -> str:
            self._act(run, row.vm_uuid, ref, decision)
            return label

        detail: dict[str, object] = {"action": label, "reason": decision.reason}
        if decision.action is escalation.Action.HOLD_LINK:
            detail["restore_ms"] = decision.restore_ms  # a restart's release restores it
        try:
            rt.step(run, "tune", row.vm_uuid, detail, act)
        except (errors.CoordinatorError, DriverError) as e:
            LOG.warning("tuning failed vm=%s action=%s error=%s", row.vm_uuid, label, e)
            rt.publish(run, cpb.DRAIN_EVENT_KIND_TUNED, vm=row, message=f"{label} failed: {e}")
            return row, escalation.applied(done, decision, at_s, ok=False)
        row = rt.journal.update_vm(
            run.drain_id, row.vm_uuid, tuning_applied=[*row.tuning_applied, label]
        )
        rt.publish(run, cpb.DRAIN_EVENT_KIND_TUNED, vm=row, message=f"{label}: {decision.reason}")
        return row, escalation.applied(done, decision, at_s)
