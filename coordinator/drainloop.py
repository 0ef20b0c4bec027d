"""A drain's own thread (`drain/<host>`): disable, plan, then dispatch in plan order.

It disables the host and plans (or, after a restart, restores the journaled plan
through `restart.Restart`), then starts the queued VMs as `dispatch.ready_to_start`
allows, one thread per migration (`migwatch/<drain8>:<uuid>`), and the cold
migrations one at a time once nothing live is queued or running. A cancel skips
the queued VMs (and aborts the running live migrations if asked). The drain ends
completed, incomplete, cancelled or failed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from hostmaint.coordinator import errors, escalation, views
from hostmaint.coordinator.coldmig import ColdMigrations
from hostmaint.coordinator.dispatch import ready_to_start
from hostmaint.coordinator.gather import Inputs
from hostmaint.coordinator.journal import DrainRow, VmRow
from hostmaint.coordinator.livemig import LiveMigrations
from hostmaint.coordinator.nonlive import COLD, is_cold
from hostmaint.coordinator.outcomes import Outcomes
from hostmaint.coordinator.planner import DrainPlan
from hostmaint.coordinator.restart import Restart
from hostmaint.coordinator.runtime import DrainRun, Runtime, cloud_errors, ref_from_json
from hostmaint.coordinator.states import IN_FLIGHT_VM_STATES, DrainState, VmState
from hostmaint.protos import coordinator_pb2 as cpb

LOG = logging.getLogger(__name__)


class DrainLoop:
    """Runs drains to their end; `unlock(host)` releases the host's drain lock after."""

    def __init__(self, rt: Runtime, unlock: Callable[[str], None]) -> None:
        self.rt = rt
        self._unlock = unlock
        self.outcomes = Outcomes(rt)
        self.live = LiveMigrations(rt, self.outcomes)
        self.cold = ColdMigrations(rt, self.outcomes)
        self.restart = Restart(rt, self.outcomes, self._adopt)

    def run(self, run: DrainRun) -> None:
        rt = self.rt
        try:
            drain = rt.journal.drain(run.drain_id)
            rt.publish(run, cpb.DRAIN_EVENT_KIND_STARTED, message=drain.reason)
            if drain.state == DrainState.PLANNING:
                # A coordinator that died while planning left at most its disable_host
                # intent open; disabling is idempotent and is carried out again below.
                self.restart.close_interrupted(run)
                self._disable_and_plan(run, drain)
            else:
                self.restart.restore(run, drain)
            self._dispatch(run)
        except errors.CoordinatorError as e:
            LOG.warning("drain failed drain=%s host=%s error=%s", run.drain_id, run.host, e)
            rt.journal.finish_drain(run.drain_id, run.host, DrainState.FAILED, str(e))
            rt.publish(run, cpb.DRAIN_EVENT_KIND_FINISHED, message=str(e), status=True)
        except Exception as e:  # thread boundary: never leave a drain without an end
            LOG.exception("drain crashed drain=%s host=%s", run.drain_id, run.host)
            if not rt.stopped.is_set():
                rt.journal.finish_drain(
                    run.drain_id, run.host, DrainState.FAILED, f"internal error: {e}"
                )
                rt.publish(run, cpb.DRAIN_EVENT_KIND_FINISHED, message=str(e), status=True)
        finally:
            run.bus.close()
            if not rt.stopped.is_set():
                self._unlock(run.host)  # the drain ended here

    def _disable_and_plan(self, run: DrainRun, drain: DrainRow) -> None:
        rt = self.rt
        reason = drain.reason or f"hostmaint drain {drain.id}"

        def disable() -> str:
            with cloud_errors(run.host):
                rt.driver.disable_host(run.host, reason)
            return "disabled"

        rt.step(run, "disable_host", "", {"reason": reason}, disable)
        rt.publish(run, cpb.DRAIN_EVENT_KIND_HOST_DISABLED, message=reason)
        plan_pb, plan, inputs = rt.plan(run.host, run.policy_pb)
        for note in inputs.notes:
            rt.publish(run, cpb.DRAIN_EVENT_KIND_BLOCKED, message=note)
        run.remember(plan, inputs)
        rows = self._rows(run, plan, inputs)
        rt.journal.save_plan(run.drain_id, views.plan_json(plan_pb), rows)
        rt.publish(run, cpb.DRAIN_EVENT_KIND_PLANNED, plan=plan_pb)
        for row in rt.journal.vms(run.drain_id):
            kind = (
                cpb.DRAIN_EVENT_KIND_QUEUED
                if row.state == VmState.QUEUED
                else cpb.DRAIN_EVENT_KIND_BLOCKED
            )
            rt.publish(run, kind, vm=row, message=row.error)

    def _rows(self, run: DrainRun, plan: DrainPlan, inputs: Inputs) -> list[VmRow]:
        rows = [
            VmRow(
                drain_id=run.drain_id,
                vm_uuid=m.vm_uuid,
                name=m.vm_name,
                position=m.position,
                state=VmState.QUEUED,
                source_host=run.host,
                planned_target=m.target or "",
                tuning=str(m.tuning),
                predicted_total_s=m.predicted_total_s,
                predicted_downtime_ms=m.predicted_downtime_ms,
                planned=run.vm_plan_json(m),
            )
            for m in plan.migrations
        ]
        for u in plan.unmovable:
            rows.append(
                VmRow(
                    drain_id=run.drain_id,
                    vm_uuid=u.vm_uuid,
                    name=u.vm_name,
                    position=len(rows),
                    state=VmState.UNMOVABLE,
                    source_host=run.host,
                    error=u.reason,
                )
            )
        for inst in inputs.not_live:
            fate = self.rt.non_live(inst, inputs, run.policy_pb)
            rows.append(
                VmRow(
                    drain_id=run.drain_id,
                    vm_uuid=inst.uuid,
                    name=inst.name,
                    position=len(rows),
                    state=VmState.QUEUED if fate.cold else VmState.UNMOVABLE,
                    source_host=run.host,
                    planned_target=(fate.target or "") if fate.cold else "",
                    tuning=COLD if fate.cold else "",
                    error="" if fate.cold else fate.reason,
                )
            )
        return rows

    def _dispatch(self, run: DrainRun) -> None:
        rt = self.rt
        cancelled_running = False
        while not rt.stopped.is_set():
            drain = rt.journal.drain(run.drain_id)
            rows = rt.journal.vms(run.drain_id)
            running_rows = [r for r in rows if r.state in IN_FLIGHT_VM_STATES]
            queued = [r for r in rows if r.state == VmState.QUEUED]
            if drain.cancel_requested:
                if drain.state != DrainState.CANCELLING:
                    rt.journal.update_drain(run.drain_id, state=DrainState.CANCELLING)
                for r in queued:
                    rt.journal.update_vm(
                        run.drain_id, r.vm_uuid, state=VmState.SKIPPED, error="drain cancelled"
                    )
                queued = []
                if drain.abort_running and not cancelled_running:
                    cancelled_running = True
                    # A cold migration cannot be aborted: it is confirmed and ends.
                    for r in running_rows:
                        # a broken post-copy is never aborted: it would lose the guest
                        if not is_cold(r) and r.state != VmState.POSTCOPY_PAUSED:
                            self.outcomes.abort(run, r, "drain cancelled")
            alive = run.threads.alive()
            if not queued and not running_rows and not alive:
                break
            cold = [r for r in queued if is_cold(r)]
            queued = [r for r in queued if not is_cold(r)]
            for slot in ready_to_start(
                [run.slot(r) for r in queued],
                [run.slot(r) for r in running_rows],
                max_parallel=run.policy.max_parallel_per_source,
                max_parallel_per_target=run.policy.max_parallel_per_target,
                link_bytes_per_s=run.link_bytes_per_s,
            ):
                row = rt.journal.update_vm(run.drain_id, slot.vm_uuid, state=VmState.MIGRATING)
                self._spawn(run, row, adopt=False)
            if cold and not queued and not running_rows and not alive:
                # One at a time, alone: its disk copy would share the live migrations' link.
                row = rt.journal.update_vm(run.drain_id, cold[0].vm_uuid, state=VmState.MIGRATING)
                self._spawn(run, row, adopt=False)
            rt.nap()
        if rt.stopped.is_set():
            return
        rows = rt.journal.vms(run.drain_id)
        drain = rt.journal.drain(run.drain_id)
        if drain.cancel_requested:
            state = DrainState.CANCELLED
        elif all(r.state == VmState.COMPLETED for r in rows):
            state = DrainState.COMPLETED
        else:
            state = DrainState.INCOMPLETE
        rt.journal.finish_drain(run.drain_id, run.host, state)
        rt.publish(run, cpb.DRAIN_EVENT_KIND_FINISHED, message=str(state), status=True)

    def _adopt(self, run: DrainRun, row: VmRow, done: escalation.Escalation | None) -> None:
        """Follows a migration started before the restart; `done`: its ladder's state."""
        self._spawn(run, row, adopt=True, done=done)

    def _spawn(
        self, run: DrainRun, row: VmRow, adopt: bool, done: escalation.Escalation | None = None
    ) -> None:
        thread = threading.Thread(
            target=self._run_vm,
            args=(run, row, adopt, done),
            name=f"migwatch/{run.drain_id[:8]}:{row.vm_uuid}",
            daemon=True,
        )
        run.threads.add(row.vm_uuid, thread)
        thread.start()

    def _run_vm(
        self, run: DrainRun, row: VmRow, adopt: bool, done: escalation.Escalation | None
    ) -> None:
        rt = self.rt
        try:
            if is_cold(row):
                self.cold.run(run, row, adopt)
                return
            ref = ref_from_json(row.migration_ref) if adopt else self.live.start(run, row)
            if ref is None:
                return
            row = rt.journal.vm(run.drain_id, row.vm_uuid)
            end = self.live.follow(run, row, ref, done)
            if end.stranded:
                self.outcomes.strand(run, rt.journal.vm(run.drain_id, row.vm_uuid), end.error)
                return
            row = rt.journal.vm(run.drain_id, row.vm_uuid)
            self.outcomes.finish(run, row, end.completed, end.downtime_ms, end.error)
        except Exception as e:  # thread boundary: the VM's row must not stay "migrating"
            LOG.exception("migration thread crashed vm=%s", row.vm_uuid)
            if not rt.stopped.is_set() and is_cold(row):
                self.cold.fail(run, row, f"internal error: {e}")
            elif not rt.stopped.is_set():
                self.outcomes.finish(
                    run,
                    rt.journal.vm(run.drain_id, row.vm_uuid),
                    False,
                    0,
                    f"internal error: {e}",
                )
        finally:
            run.link.end(row.vm_uuid)
            rt.poke()
