"""How a VM's migration ends up in the journal and the event stream.

Started, completed, retried on another target, failed; and the two clean-ups a
migration's end may need (its vCPU throttle lifted, or the job aborted).
"""

from __future__ import annotations

import dataclasses
import logging

from hostmaint.coordinator import errors
from hostmaint.coordinator.drivers.base import DriverError, InstanceState, MigrationRef
from hostmaint.coordinator.journal import VmRow
from hostmaint.coordinator.runtime import DrainRun, Runtime, ref_from_json, ref_json
from hostmaint.coordinator.states import VmState
from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import coordinator_pb2 as cpb

LOG = logging.getLogger(__name__)


class Outcomes:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def started(self, run: DrainRun, row: VmRow, ref: MigrationRef, target: str | None) -> None:
        rt = self.rt
        row = rt.journal.update_vm(
            run.drain_id,
            row.vm_uuid,
            state=VmState.MIGRATING,
            migration_ref=ref_json(ref),
            attempts=row.attempts + 1,
            started_at=rt.clock(),
            target_host=target or "",
            error="",
        )
        rt.publish(
            run, cpb.DRAIN_EVENT_KIND_MIGRATION_STARTED, vm=row, message=target or "(scheduler)"
        )

    def finish(self, run: DrainRun, row: VmRow, ok: bool, downtime_ms: float, error: str) -> None:
        rt = self.rt
        now = rt.clock()
        if ok:
            row = rt.journal.update_vm(
                run.drain_id,
                row.vm_uuid,
                state=VmState.COMPLETED,
                actual_total_s=now - (row.started_at or now),
                actual_downtime_ms=downtime_ms,
                finished_at=now,
                error="",
            )
            rt.publish(run, cpb.DRAIN_EVENT_KIND_MIGRATION_COMPLETED, vm=row)
            return
        if rt.stopped.is_set():
            return
        drain = rt.journal.drain(run.drain_id)
        if drain.cancel_requested:
            _, refused = self._clear_cloud_error(
                run, row, row.target_host or None, wait_s=rt.driver.error_settle_s
            )
            error = f"{error}; {refused}" if refused else error
            row = rt.journal.update_vm(
                run.drain_id, row.vm_uuid, state=VmState.SKIPPED, error=error, finished_at=now
            )
            rt.publish(run, cpb.DRAIN_EVENT_KIND_MIGRATION_FAILED, vm=row, message=error)
            return
        self.retry_or_fail(run, row, error, row.target_host or None, count_attempt=False)

    def retry_or_fail(
        self,
        run: DrainRun,
        row: VmRow,
        error: str,
        failed_target: str | None,
        count_attempt: bool,
    ) -> None:
        rt = self.rt
        row = rt.journal.vm(run.drain_id, row.vm_uuid)
        inst_host = rt.host_of(row.vm_uuid)
        if inst_host is not None and inst_host != run.host:
            # The attempt looked failed from here (its agent or libvirtd went away, the
            # answer was lost) but the VM runs elsewhere now: where it runs is the truth.
            LOG.warning("moved despite a failed attempt vm=%s error=%s", row.vm_uuid, error)
            now = rt.clock()
            row = rt.journal.update_vm(
                run.drain_id,
                row.vm_uuid,
                state=VmState.COMPLETED,
                target_host=inst_host,
                actual_total_s=now - (row.started_at or now),
                finished_at=now,
                error="",
            )
            rt.publish(
                run,
                cpb.DRAIN_EVENT_KIND_MIGRATION_COMPLETED,
                vm=row,
                message=f"runs on {inst_host} (the attempt reported: {error})",
            )
            return
        last = row.attempts + (1 if count_attempt else 0) >= rt.settings.max_attempts
        # Before a retry the error shows at the latest when the next start is refused (and
        # then cleared); before giving up there is no next start: wait for it to show.
        reset, refused = self._clear_cloud_error(
            run, row, failed_target, wait_s=rt.driver.error_settle_s if last else 0.0
        )
        # A start the cloud refused only for the error it had left is not an attempt.
        attempts = row.attempts + (1 if count_attempt and not reset else 0)
        if refused:
            self.fail(run, row, f"{error}; {refused}", attempts=attempts)
            return
        if attempts < rt.settings.max_attempts:
            target = self._other_target(run, row, failed_target)
            replanned = run.planned.get(row.vm_uuid)
            row = rt.journal.update_vm(
                run.drain_id,
                row.vm_uuid,
                state=VmState.QUEUED,
                attempts=attempts,
                target_host=target or "",
                planned_target=target or "",
                error=error,
                planned=run.vm_plan_json(replanned) if replanned else row.planned,
            )
            rt.publish(
                run,
                cpb.DRAIN_EVENT_KIND_RETRIED,
                vm=row,
                message=f"{error}; next target {target or '(scheduler)'}",
            )
            return
        self.fail(run, row, error, attempts=attempts)

    def _clear_cloud_error(
        self, run: DrainRun, row: VmRow, failed_target: str | None, *, wait_s: float
    ) -> tuple[bool, str]:
        """After a failed or aborted live migration the cloud may mark the VM failed
        though it runs on its host, unmoved (Nova 34.0.0 does so for every aborted live
        migration, and refuses to move it again). Once the agents confirm it runs on
        this host and not on the target, the cloud's error is cleared as a journaled
        step. Returns whether it was reset, and why it was not ("" when the VM is fine
        or was reset)."""
        rt = self.rt
        deadline = rt.clock() + wait_s
        while True:
            try:
                inst = rt.driver.get_instance(row.vm_uuid)
            except DriverError:
                return False, ""  # no answer: the next start will say what the cloud thinks
            if inst.state is InstanceState.ERROR:
                break
            # Nova marks the VM failed a moment after its migration record ends.
            if rt.clock() >= deadline or rt.stopped.wait(rt.settings.poll_interval_s):
                return False, ""
        here = rt.runs_on(run.host, row.vm_uuid)
        there = rt.runs_on(failed_target, row.vm_uuid) if failed_target else False
        if inst.host != run.host or inst.task_state is not None or here is not True or there:
            return False, (
                f"the cloud left the VM in error (host {inst.host}, task {inst.task_state}); "
                f"running on {run.host}: {here}, on {failed_target or 'the target'}: {there}; "
                "not reset"
            )
        step = rt.journal.begin_step(run.drain_id, "reset_state", row.vm_uuid, {"host": run.host})
        try:
            rt.driver.reset_to_active(row.vm_uuid)
        except DriverError as e:
            rt.journal.end_step(step, False, str(e))
            return False, f"the cloud left the VM in error and refused to reset it: {e}"
        rt.journal.end_step(step, True, "error cleared: the VM runs on its host")
        LOG.warning("cloud error state cleared vm=%s host=%s", row.vm_uuid, run.host)
        return True, ""

    def fail(self, run: DrainRun, row: VmRow, error: str, *, attempts: int) -> None:
        """The VM stays where it is: its migration failed for good."""
        rt = self.rt
        row = rt.journal.update_vm(
            run.drain_id,
            row.vm_uuid,
            state=VmState.FAILED,
            attempts=attempts,
            error=error,
            finished_at=rt.clock(),
        )
        rt.publish(run, cpb.DRAIN_EVENT_KIND_MIGRATION_FAILED, vm=row, message=error)

    def strand(self, run: DrainRun, row: VmRow, message: str) -> None:
        """Its post-copy broke and cannot be resumed: the VM runs nowhere. Said plainly,
        journaled with where its halves are, never retried, never counted as moved."""
        rt = self.rt
        target = row.target_host or ""
        step = rt.journal.begin_step(
            run.drain_id, "stranded", row.vm_uuid, {"source": run.host, "target": target}
        )
        rt.journal.end_step(step, True, message)
        row = rt.journal.update_vm(
            run.drain_id, row.vm_uuid, state=VmState.STRANDED, error=message, finished_at=rt.clock()
        )
        LOG.error(
            "VM stranded by a broken post-copy vm=%s drain=%s: %s",
            row.vm_uuid,
            run.drain_id[:8],
            message,
        )
        rt.publish(run, cpb.DRAIN_EVENT_KIND_STRANDED, vm=row, message=message)

    def _other_target(self, run: DrainRun, row: VmRow, failed: str | None) -> str | None:
        """Another target for a retry: re-plan this VM alone, excluding the one that failed."""
        policy_pb = cpb.DrainPolicy()
        policy_pb.CopyFrom(run.policy_pb)
        try:
            inputs = self.rt.gather(run.host, policy_pb, measure=False)
        except errors.CoordinatorError as e:
            LOG.warning("cannot re-plan a retry vm=%s error=%s", row.vm_uuid, e)
            return failed
        vms = [v for v in inputs.vms if v.uuid == row.vm_uuid]
        targets = [t for t in inputs.targets if t.name != failed] or list(inputs.targets)
        if not vms or not targets:
            return failed
        alone = dataclasses.replace(inputs, vms=tuple(vms), targets=tuple(targets))
        plan = self.rt.plan_drain(alone, run.policy)
        if not plan.migrations:
            return failed
        run.planned[row.vm_uuid] = plan.migrations[0]
        return plan.migrations[0].target

    def abort(self, run: DrainRun, row: VmRow, reason: str) -> None:
        def act() -> str:
            self.rt.driver.abort(ref_from_json(row.migration_ref))
            return "aborted"

        try:
            self.rt.step(run, "abort", row.vm_uuid, {"reason": reason}, act)
        except (DriverError, ValueError) as e:
            LOG.warning("abort failed vm=%s error=%s", row.vm_uuid, e)

    def unthrottle(self, run: DrainRun, row: VmRow) -> None:
        """The vCPU cap travels with the live XML: lift it wherever the VM runs now."""
        for host in (row.target_host, run.host):
            if not host:
                continue
            try:
                self.rt.registry.client(host).tune(
                    apb.TuneMigrationRequest(domain_uuid=row.vm_uuid, vcpu_throttle_pct=0)
                )
                return
            except errors.CoordinatorError:
                continue  # not on that host
        LOG.warning("could not lift the vCPU throttle vm=%s", row.vm_uuid)
