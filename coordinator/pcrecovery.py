"""A post-copy whose link broke after the switch: resume it, or say plainly it cannot be.

Once a migration has switched to post-copy, the guest runs on the target while the
pages it has not pulled yet are still on the source. When the link breaks then,
libvirt (8.5 and later) leaves the guest paused on the source and waiting on the
target, and keeps the job so that it can be resumed (VIR_MIGRATE_POSTCOPY_RESUME)
once the link is back. Aborting it would lose the guest: no step here ever does.

While the source agent reports the migration paused (MIGRATION_PHASE_POSTCOPY_PAUSED),
the VM's journal state is ``postcopy_paused`` and the coordinator asks the cloud to
resume it: at once, then after waits that double (``[drain]
postcopy_resume_first_s`` up to ``postcopy_resume_max_s``), each try a journaled
``resume_postcopy`` step. The waits are the watch's own samples: nothing sleeps here.
It gives up, and reports the VM ``stranded`` with where its halves are, when the
target has no copy of the guest any more (seen twice, so that one odd answer does
not decide), when the cloud cannot resume post-copies (Nova, see docs/nova.md), or
once the migration has been paused for ``postcopy_recovery_deadline_s``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from hostmaint.coordinator import errors
from hostmaint.coordinator.drivers.base import DriverError, MigrationRef, TargetHalf
from hostmaint.coordinator.journal import VmRow
from hostmaint.coordinator.runtime import DrainRun, Runtime
from hostmaint.coordinator.states import VmState
from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import coordinator_pb2 as cpb

LOG = logging.getLogger(__name__)
GONE_CONFIRMATIONS = 2


def resume_wait_s(tries: int, first_s: float, max_s: float) -> float:
    """The wait after the `tries`-th try to resume (pure): 0 before the first, then
    `first_s` doubling up to `max_s`."""
    if tries <= 0:
        return 0.0
    return float(min(max_s, first_s * 2 ** min(tries - 1, 30)))


def halves(name: str, source: str, target: str, half: TargetHalf) -> str:
    """Where a broken post-copy's VM is, in plain words (pure)."""
    if half is TargetHalf.GONE:
        return (
            f"{name} runs nowhere: its copy on {target} is gone, with its state since the "
            f"switch; {source} holds it paused with an outdated memory (post-copy failed). "
            f"Not moved. Keep {source}'s paused domain for the operator: it is what is left."
        )
    where = "unreachable" if half is TargetHalf.UNREACHABLE else "present"
    return (
        f"{name} runs nowhere: its vCPUs, devices and the pages written since the switch are "
        f"on {target} ({where}), the pages not yet copied on {source}, where it is paused "
        f"(post-copy failed). Not moved. Destroy neither half: once {target} and the link "
        f"are back, resume it from {source} (virsh migrate --postcopy --postcopy-resume)."
    )


@dataclass
class Pause:
    """One broken post-copy while the coordinator tries to resume it."""

    since: float
    tries: int = 0
    next_try: float = 0.0
    gone_seen: int = 0
    half: TargetHalf = TargetHalf.PRESENT
    last_error: str = ""
    stranded: str = ""  # why it cannot be resumed, and where its halves are
    # paused now (False once resumed: a post-copy that breaks again keeps its first
    # break's time, so that a link that keeps failing meets the deadline)
    active: bool = True


class PostcopyRecovery:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def paused(
        self,
        run: DrainRun,
        row: VmRow,
        ref: MigrationRef,
        pause: Pause | None,
        progress: apb.MigrationProgress,
    ) -> tuple[VmRow, Pause]:
        """One sample of the paused migration: journal the pause (the first time), try to
        resume it when the backoff allows; `pause.stranded` says when it cannot be."""
        rt = self.rt
        now = rt.clock()
        target = row.target_host or "the target"
        if pause is None or not pause.active:
            if pause is None:
                pause = Pause(since=now, next_try=now)
            pause.active = True
            row = self._journal_pause(run, row, target)
        rt.publish(run, cpb.DRAIN_EVENT_KIND_PROGRESS, vm=row, progress=progress)
        if not rt.driver.can_resume_postcopy:
            pause.stranded = (
                f"post-copy to {target} broke and this cloud cannot resume it (Nova rolls a "
                f"failed live migration back): {halves(row.name, run.host, target, pause.half)}"
            )
            return row, pause
        if now < pause.next_try:
            return row, pause
        if not self._try_resume(run, row, ref, pause):
            # refused: what is left on the target decides whether to go on trying
            pause.half = self._target_half(ref)
            pause.gone_seen = pause.gone_seen + 1 if pause.half is TargetHalf.GONE else 0
            paused_s = rt.clock() - pause.since
            if pause.gone_seen >= GONE_CONFIRMATIONS:
                pause.stranded = (
                    f"post-copy to {target} broke and cannot be resumed: {target} has no copy "
                    f"of the VM any more. {halves(row.name, run.host, target, pause.half)}"
                )
                return row, pause
            if paused_s > rt.settings.postcopy_recovery_deadline_s:
                pause.stranded = (
                    f"post-copy to {target} broke {paused_s:.0f} s ago and was not resumed in "
                    f"{pause.tries} tries (target {pause.half}; last: {pause.last_error or '-'}). "
                    f"{halves(row.name, run.host, target, pause.half)}"
                )
                return row, pause
        # from the answer, not the ask: a resume may take the agent seconds to answer
        pause.next_try = rt.clock() + resume_wait_s(
            pause.tries, rt.settings.postcopy_resume_first_s, rt.settings.postcopy_resume_max_s
        )
        return row, pause

    def resumed(self, run: DrainRun, row: VmRow, pause: Pause) -> VmRow:
        rt = self.rt
        pause.active = False
        took = rt.clock() - pause.since
        row = rt.journal.update_vm(run.drain_id, row.vm_uuid, state=VmState.MIGRATING, error="")
        message = f"post-copy resumed after {took:.1f} s paused and {pause.tries} tries"
        LOG.warning(
            "post-copy resumed vm=%s drain=%s after_s=%.1f", row.vm_uuid, run.drain_id[:8], took
        )
        rt.publish(run, cpb.DRAIN_EVENT_KIND_POSTCOPY_RESUMED, vm=row, message=message)
        return row

    def _journal_pause(self, run: DrainRun, row: VmRow, target: str) -> VmRow:
        rt = self.rt
        why = (
            f"post-copy to {target} broke: paused on {run.host}, waiting on {target}; "
            f"resuming when the link is back (for up to "
            f"{rt.settings.postcopy_recovery_deadline_s:.0f} s)"
        )
        step = rt.journal.begin_step(
            run.drain_id, "postcopy_paused", row.vm_uuid, {"source": run.host, "target": target}
        )
        rt.journal.end_step(step, True, why)
        row = rt.journal.update_vm(
            run.drain_id, row.vm_uuid, state=VmState.POSTCOPY_PAUSED, error=why
        )
        LOG.error("post-copy broke vm=%s drain=%s target=%s", row.vm_uuid, run.drain_id[:8], target)
        rt.publish(run, cpb.DRAIN_EVENT_KIND_POSTCOPY_PAUSED, vm=row, message=why)
        return row

    def _target_half(self, ref: MigrationRef) -> TargetHalf:
        try:
            return self.rt.driver.postcopy_target(ref)
        except DriverError as e:
            LOG.info("cannot tell the target's half vm=%s error=%s", ref.instance_uuid, e)
            return TargetHalf.UNREACHABLE

    def _try_resume(self, run: DrainRun, row: VmRow, ref: MigrationRef, pause: Pause) -> bool:
        """One journaled try; True when the cloud took it."""
        rt = self.rt
        pause.tries += 1
        uri = (rt.settings.migration_addresses or {}).get(row.target_host, "")

        def act() -> str:
            rt.driver.resume_postcopy(ref, uri)
            return "resumed"

        try:
            rt.step(run, "resume_postcopy", row.vm_uuid, {"try": pause.tries}, act)
        except (DriverError, errors.CoordinatorError) as e:
            pause.last_error = str(e)
            LOG.info("post-copy not resumed yet vm=%s try=%d error=%s", row.vm_uuid, pause.tries, e)
            return False
        return True
