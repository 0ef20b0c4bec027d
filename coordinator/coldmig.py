"""One cold migration: a VM that cannot move live, moved while it does not run.

Cold migrations run one at a time once no live migration is queued or running:
a cold migration of a VM on local disks copies the disk over the same network,
which the live migrations' link plan does not account for. Each is journaled
(`cold_migrate`, then `confirm_migration`), followed on the cloud's migration
record until it awaits confirmation, confirmed, and followed to its end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from hostmaint.coordinator.drivers.base import (
    DriverError,
    InstanceState,
    MigrationRef,
    MigrationState,
)
from hostmaint.coordinator.journal import VmRow
from hostmaint.coordinator.livemig import WATCH_DEADLINE_S
from hostmaint.coordinator.nonlive import COLD_STATES
from hostmaint.coordinator.outcomes import Outcomes
from hostmaint.coordinator.runtime import DrainRun, Runtime, ref_from_json

LOG = logging.getLogger(__name__)
_CONFIRM_ATTEMPTS = 3


@dataclass(frozen=True)
class _Ended:
    completed: bool
    dest: str
    error: str


class ColdMigrations:
    def __init__(self, rt: Runtime, outcomes: Outcomes) -> None:
        self.rt = rt
        self.outcomes = outcomes

    def run(self, run: DrainRun, row: VmRow, adopt: bool) -> None:
        """Starts (or re-attaches to) a cold migration, confirms it and records its end."""
        rt = self.rt
        ref = ref_from_json(row.migration_ref) if adopt else self._start(run, row)
        if ref is None:
            return
        row = rt.journal.vm(run.drain_id, row.vm_uuid)
        ended = self._follow(run, row, ref)
        if rt.stopped.is_set():
            return
        if not ended.completed:
            self.fail(run, row, ended.error)
            return
        if ended.dest and ended.dest != row.target_host:
            row = rt.journal.update_vm(run.drain_id, row.vm_uuid, target_host=ended.dest)
        # The VM did not run before and does not run after: no downtime to speak of.
        self.outcomes.finish(run, row, True, 0.0, "")

    def _state(self, vm_uuid: str) -> InstanceState | None:
        try:
            return self.rt.driver.get_instance(vm_uuid).state
        except DriverError as e:
            LOG.warning("cannot re-check the VM's state vm=%s error=%s", vm_uuid, e)
            return None  # the cloud checks the state itself

    def _start(self, run: DrainRun, row: VmRow) -> MigrationRef | None:
        """Journals the intent, then asks the cloud once; a refusal fails the VM at once."""
        rt = self.rt
        state = self._state(row.vm_uuid)
        if state is not None and state not in COLD_STATES:
            # Started since the plan: a cold migration would stop it.
            self.fail(run, row, f"the VM is {state} now: not cold-migrated (that would stop it)")
            return None
        target = row.target_host or row.planned_target or None
        detail: dict[str, object] = {"attempt": row.attempts + 1, "target": target or ""}
        started = rt.start_step(
            run, "cold_migrate", row, detail, lambda: rt.driver.cold_migrate(row.vm_uuid, target)
        )
        if started.ref is None:
            self.fail(run, row, started.error, count_attempt=True)
            return None
        self.outcomes.started(run, row, started.ref, target)
        return started.ref

    def _follow(self, run: DrainRun, row: VmRow, ref: MigrationRef) -> _Ended:
        """Polls the cloud's record to its end, confirming it when it waits for that.

        The record is re-read before every confirmation, so a resumed drain whose
        confirmation had reached the cloud (the record is then `confirming` or
        `confirmed`) does not confirm twice.
        """
        rt = self.rt
        started = row.started_at or rt.clock()
        failed_confirms = 0
        dest = ""
        for status in rt.statuses(ref, row.vm_uuid, "cold migration"):
            if status is not None:
                dest = status.dest_host or dest
                if status.state is MigrationState.COMPLETED:
                    return _Ended(True, dest, "")
                if status.state.finished:
                    return _Ended(
                        False, dest, f"cold migration {status.state} ({status.cloud_status})"
                    )
                if status.state is MigrationState.AWAITING_CONFIRM:
                    error = self._confirm(run, row, ref)
                    if error:
                        failed_confirms += 1
                        if failed_confirms >= _CONFIRM_ATTEMPTS:
                            return _Ended(
                                False, dest, f"confirming the cold migration failed: {error}"
                            )
            if rt.clock() - started > WATCH_DEADLINE_S:
                return _Ended(
                    False, dest, f"cold migration not finished after {WATCH_DEADLINE_S:.0f} s"
                )
        return _Ended(False, dest, "coordinator stopping")

    def _confirm(self, run: DrainRun, row: VmRow, ref: MigrationRef) -> str:
        """Confirms a cold migration (a journaled step); returns the error, or ""."""

        def act() -> str:
            self.rt.driver.confirm_migration(ref)
            return "confirmed"

        detail: dict[str, object] = {"migration_id": ref.migration_id}
        try:
            self.rt.step(run, "confirm_migration", row.vm_uuid, detail, act)
        except DriverError as e:
            LOG.warning("cold migration confirm failed vm=%s error=%s", row.vm_uuid, e)
            return str(e)
        LOG.info("cold migration confirmed vm=%s drain=%s", row.vm_uuid, run.drain_id[:8])
        return ""

    def fail(self, run: DrainRun, row: VmRow, error: str, count_attempt: bool = False) -> None:
        """A cold migration is tried once: the cloud refused it or it ended badly."""
        row = self.rt.journal.vm(run.drain_id, row.vm_uuid)
        self.outcomes.fail(run, row, error, attempts=row.attempts + (1 if count_attempt else 0))
