"""A restarted coordinator picks a drain up where the journal left it.

The journaled plan first (each VM's settings), then each VM reconciled with the
world: intents with no outcome are settled by what the cloud says; running
migrations are adopted at once, each with its planned settings and its ladder
where it stood (`resume.py`); one that ended meanwhile is recorded as it ended,
not tuned; queued VMs that left the host meanwhile are done; a burst the previous
coordinator left goes on until its holder's ladder releases it, or is undone when
its hold's outcome is unknown or its holder ended. Nothing is measured.

What each VM's journal row and the world amount to is decided in `reconcile.py`
(pure); this module reads the world and journals the decisions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from hostmaint.coordinator import escalation, reconcile, resume, views
from hostmaint.coordinator.drivers.base import DriverError, MigrationStatus
from hostmaint.coordinator.journal import STEP_DONE, STEP_INTENT, DrainRow, StepRow, VmRow
from hostmaint.coordinator.nonlive import is_cold
from hostmaint.coordinator.outcomes import Outcomes
from hostmaint.coordinator.reconcile import Verdict
from hostmaint.coordinator.runtime import DrainRun, Runtime, ref_from_json, ref_json
from hostmaint.coordinator.states import IN_FLIGHT_VM_STATES, VmState
from hostmaint.protos import coordinator_pb2 as cpb

LOG = logging.getLogger(__name__)
INTERRUPTED = "interrupted by a coordinator restart"

# Follows a migration started before the restart: (run, row, its ladder's state or None).
Adopt = Callable[[DrainRun, VmRow, escalation.Escalation | None], None]


@dataclass(frozen=True)
class _Running:
    row: VmRow
    done: escalation.Escalation
    hold_done: bool = False  # it holds the link by a hold known to have been carried out


class Restart:
    def __init__(self, rt: Runtime, outcomes: Outcomes, adopt: Adopt) -> None:
        self.rt = rt
        self.outcomes = outcomes
        self._adopt = adopt

    def close_interrupted(self, run: DrainRun) -> None:
        """Ends the open steps that are carried out again rather than reconciled."""
        for step in self.rt.journal.open_steps(run.drain_id):
            self.rt.journal.end_step(step.id, False, INTERRUPTED)

    def restore(self, run: DrainRun, drain: DrainRow) -> None:
        """After a restart: the journaled plan, then each VM reconciled with the world.

        A drain journaled without each VM's settings (before revision 0002) is planned
        afresh for them, measuring as a first plan does.
        """
        rt = self.rt
        steps = rt.journal.steps(run.drain_id)
        if not self._recall(run, drain):
            _, plan, inputs = rt.plan(run.host, run.policy_pb)
            run.remember(plan, inputs)
        for step in steps:
            if step.state != STEP_INTENT:
                continue
            if step.action in ("start_migration", "cold_migrate"):
                self._reconcile_start(run, step, live=step.action == "start_migration")
            elif step.action == "confirm_migration":
                self._reconcile_confirm(run, step.id, step.vm_uuid)
        self.close_interrupted(run)
        running: list[_Running] = []
        ended: list[tuple[VmRow, MigrationStatus, escalation.Escalation]] = []
        burst_left = False  # a migration may hold the link: the others may be capped
        for row in rt.journal.vms(run.drain_id):
            if row.state == VmState.MIGRATING and not row.migration_ref:
                # Dispatched, but the coordinator died before the start was journaled.
                row = self._reconcile_unstarted(run, row)
            tunes = self._tune_steps(row, steps)
            done = resume.ladder_state(tunes)
            burst_left = burst_left or done.holding
            if row.state not in IN_FLIGHT_VM_STATES:  # a paused post-copy is followed too
                continue
            cold = is_cold(row)
            # a cold migration's follower reads the cloud's record itself
            status = None if cold else self._status_of(row)
            if reconcile.journaled_start(cold=cold, record=status).verdict is Verdict.ENDED:
                assert status is not None
                ended.append((row, status, done))
            elif cold:
                self._adopt_logged(run, row, None)
            else:
                running.append(_Running(row, done, resume.hold_done(tunes)))
        if burst_left:
            running = self._burst_left(run, running)
        for r in running:
            self._adopt_logged(run, r.row, r.done)
        for row, status, done in ended:
            self._reconcile_ended(run, row, status, done)
        self._reconcile_queued(run)

    def _adopt_logged(self, run: DrainRun, row: VmRow, done: escalation.Escalation | None) -> None:
        LOG.info("re-attaching to migration vm=%s drain=%s", row.vm_uuid, run.drain_id[:8])
        self._adopt(run, row, done)

    def _recall(self, run: DrainRun, drain: DrainRow) -> bool:
        """The plan the journal holds, into `run`; False when it lacks a VM's settings."""
        plans: dict[str, resume.VmPlan] = {}
        for row in self.rt.journal.vms(run.drain_id):
            if not row.planned:
                if row.state in (VmState.QUEUED, VmState.MIGRATING) and not is_cold(row):
                    return False
                continue
            try:
                plans[row.vm_uuid] = resume.vm_plan_from_json(row.planned)
            except ValueError as e:
                LOG.warning("journaled settings unreadable vm=%s error=%s", row.vm_uuid, e)
                return False
        if not drain.plan:
            return False
        link = views.plan_from_json(drain.plan).link_bandwidth_bytes_per_s
        run.planned = {u: p.planned for u, p in plans.items()}
        run.cpu_bound = frozenset(u for u, p in plans.items() if p.cpu_bound)
        run.source = next((p.source for p in plans.values()), run.source)
        run.link_bytes_per_s = link or self.rt.settings.link_bandwidth_bytes_per_s
        LOG.info("resuming the journaled plan drain=%s vms=%d", run.drain_id[:8], len(plans))
        return True

    def _burst_left(self, run: DrainRun, running: list[_Running]) -> list[_Running]:
        """A burst the previous coordinator left in force: it goes on (its holder's ladder
        releases it in its time) or is undone now (`reconcile.burst_left`); the running
        migrations, their ladders as they stand after that."""
        holder = next((r for r in running if r.done.holding), None)
        decision = reconcile.burst_left(
            holder_running=holder is not None, hold_done=holder is not None and holder.hold_done
        )
        LOG.info("%s drain=%s", decision.note, run.drain_id[:8])
        if decision.verdict is Verdict.HELD:
            assert holder is not None
            started = holder.row.started_at or self.rt.clock()  # as `_tune_steps` counts
            run.link.resume(
                holder.row.vm_uuid,
                started=started + holder.done.level_at_s,
                restore_ms=holder.done.restore_ms or run.planned_limit_ms(holder.row.vm_uuid),
                held=[r.row.vm_uuid for r in running],
            )
            return running
        # the holder's limit back first, then the others' bandwidth
        return [
            _Running(r.row, self._undo_burst(run, r.row, r.done))
            for r in sorted(running, key=lambda r: not r.done.holding)
        ]

    def _tune_steps(self, row: VmRow, steps: list[StepRow]) -> list[resume.TuneStep]:
        """The ladder's steps on the VM's current migration, as journaled."""
        mine = [s for s in steps if s.vm_uuid == row.vm_uuid]
        starts = [s.id for s in mine if s.action == "start_migration"]
        since = starts[-1] if starts else 0
        started = row.started_at or self.rt.clock()
        return [
            resume.TuneStep(
                label=str(s.detail.get("action", "")),
                at_s=s.at - started,
                ok=None
                if s.state == STEP_INTENT or s.result == INTERRUPTED
                else s.state == STEP_DONE,
                restore_ms=int(s.detail.get("restore_ms", 0)),
            )
            for s in mine
            if s.action == "tune" and s.id > since
        ]

    def _status_of(self, row: VmRow) -> MigrationStatus | None:
        """The cloud's record of the VM's migration; None when it cannot tell."""
        try:
            return self.rt.driver.get_migration(ref_from_json(row.migration_ref))
        except (DriverError, ValueError) as e:
            LOG.warning("cannot check the migration after a restart vm=%s error=%s", row.vm_uuid, e)
            return None

    def _reconcile_start(self, run: DrainRun, step: StepRow, live: bool = True) -> None:
        """An intent to start a migration with no outcome: find out whether it started.

        One that did started when its intent was journaled, as near as the journal
        knows: its ladder's time counts from then.
        """
        rt = self.rt
        step_id, vm_uuid = step.id, step.vm_uuid
        row = rt.journal.vm(run.drain_id, vm_uuid)
        ref = None
        try:
            ref = rt.driver.latest_migration(vm_uuid)
        except DriverError as e:
            LOG.warning("cannot check migration after restart vm=%s error=%s", vm_uuid, e)
        status = None
        if ref is not None:
            try:
                status = rt.driver.get_migration(ref)
            except DriverError:
                status = None
        decision = reconcile.start_intent(
            live=live,
            row_state=row.state,
            record=status,
            host=rt.host_of(vm_uuid),
            source=run.host,
            planned_target=row.planned_target,
        )
        if decision.verdict is Verdict.STARTED:
            assert ref is not None
            rt.journal.end_step(step_id, True, decision.note)
            rt.journal.update_vm(
                run.drain_id,
                vm_uuid,
                state=VmState.MIGRATING,
                migration_ref=ref_json(ref),
                attempts=row.attempts + 1,
                started_at=step.at,
                target_host=decision.target_host,
            )
        elif decision.verdict is Verdict.COMPLETED:
            rt.journal.end_step(step_id, True, decision.note)
            rt.journal.update_vm(
                run.drain_id,
                vm_uuid,
                state=VmState.COMPLETED,
                attempts=row.attempts + 1,
                started_at=step.at,
                target_host=decision.target_host,
                finished_at=rt.clock(),
                error="",
            )
        else:
            rt.journal.end_step(step_id, False, decision.note)

    def _reconcile_confirm(self, run: DrainRun, step_id: int, vm_uuid: str) -> None:
        """A confirmation with no outcome: the cloud's record says whether it arrived.

        Either way the re-attached follower re-reads the record and confirms
        only a migration still waiting for it.
        """
        row = self.rt.journal.vm(run.drain_id, vm_uuid)
        decision = reconcile.confirm_intent(self._status_of(row))
        confirmed = decision.verdict is Verdict.CONFIRMED
        self.rt.journal.end_step(step_id, confirmed, decision.note)

    def _reconcile_unstarted(self, run: DrainRun, row: VmRow) -> VmRow:
        rt = self.rt
        found = rt.started_anyway(row.vm_uuid)
        decision = reconcile.unstarted(
            cold=is_cold(row),
            running=found is not None,
            host=rt.host_of(row.vm_uuid),
            source=run.host,
        )
        if decision.verdict is Verdict.COMPLETED:
            return rt.journal.update_vm(
                run.drain_id, row.vm_uuid, state=VmState.COMPLETED, finished_at=rt.clock()
            )
        if decision.verdict is Verdict.STARTED:
            assert found is not None
            return rt.journal.update_vm(
                run.drain_id,
                row.vm_uuid,
                migration_ref=ref_json(found),
                attempts=row.attempts + 1,
                started_at=row.started_at or rt.clock(),
            )
        return rt.journal.update_vm(run.drain_id, row.vm_uuid, state=VmState.QUEUED)

    def _undo_burst(
        self, run: DrainRun, row: VmRow, done: escalation.Escalation
    ) -> escalation.Escalation:
        now = self.rt.clock()
        return run.link.reset_after_restart(
            row.vm_uuid,
            done,
            elapsed_s=now - (row.started_at or now),
            planned_limit_ms=run.planned_limit_ms(row.vm_uuid),
        )

    def _reconcile_ended(
        self,
        run: DrainRun,
        row: VmRow,
        status: MigrationStatus,
        done: escalation.Escalation,
    ) -> None:
        """A migration that ended while no coordinator followed it: its end is recorded
        (a failed one retried as any), and nothing is tuned on a job that is gone."""
        rt = self.rt
        LOG.info(
            "migration ended during the restart vm=%s drain=%s state=%s",
            row.vm_uuid,
            run.drain_id[:8],
            status.state,
        )
        if done.throttle_pct:
            self.outcomes.unthrottle(run, row)
        decision = reconcile.ended(
            record=status,
            host=rt.host_of(row.vm_uuid),
            source=run.host,
            row_target=row.target_host,
        )
        if decision.verdict is Verdict.FAILED:
            self.outcomes.finish(run, row, False, 0.0, decision.note)
            return
        row = rt.journal.update_vm(
            run.drain_id,
            row.vm_uuid,
            state=VmState.COMPLETED,
            target_host=decision.target_host,
            finished_at=rt.clock(),
            error="",
        )
        rt.publish(
            run,
            cpb.DRAIN_EVENT_KIND_MIGRATION_COMPLETED,
            vm=row,
            message="completed while no coordinator followed it",
        )

    def _reconcile_queued(self, run: DrainRun) -> None:
        """Queued VMs that left the host meanwhile are done (the cloud's list of the host)."""
        rt = self.rt
        queued = [r for r in rt.journal.vms(run.drain_id) if r.state == VmState.QUEUED]
        if not queued:
            return
        try:
            here = {i.uuid for i in rt.driver.list_instances(run.host)}
        except DriverError as e:
            LOG.warning("cannot list the host's VMs after a restart host=%s error=%s", run.host, e)
            return
        for row in queued:
            host = None if row.vm_uuid in here else rt.host_of(row.vm_uuid)
            if reconcile.queued(host, run.host).verdict is Verdict.COMPLETED:
                rt.journal.update_vm(
                    run.drain_id, row.vm_uuid, state=VmState.COMPLETED, finished_at=rt.clock()
                )
