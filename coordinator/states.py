"""The states of a drain and of each of its VMs, as the journal stores them (pure).

Their values are the journal's column values and the names of the protobuf
states (``views`` maps them), so they must not change.
"""

from __future__ import annotations

from enum import StrEnum


class DrainState(StrEnum):
    PLANNING = "planning"
    RUNNING = "running"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    INCOMPLETE = "incomplete"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def active(self) -> bool:
        """A coordinator runs (or should run) the drain."""
        return self in ACTIVE_DRAIN_STATES

    @property
    def finished(self) -> bool:
        return not self.active


class VmState(StrEnum):
    QUEUED = "queued"
    MIGRATING = "migrating"
    COMPLETED = "completed"
    FAILED = "failed"
    UNMOVABLE = "unmovable"
    SKIPPED = "skipped"
    # its post-copy broke after the switch: paused on both hosts until it is resumed
    POSTCOPY_PAUSED = "postcopy_paused"
    # its post-copy broke for good (the target is gone): it runs nowhere, never "moved"
    STRANDED = "stranded"


# a migration runs (or is paused mid-way) for the VM: its watcher follows it
IN_FLIGHT_VM_STATES = (VmState.MIGRATING, VmState.POSTCOPY_PAUSED)
ACTIVE_DRAIN_STATES = (DrainState.PLANNING, DrainState.RUNNING, DrainState.CANCELLING)
FINISHED_DRAIN_STATES = (
    DrainState.COMPLETED,
    DrainState.INCOMPLETE,
    DrainState.CANCELLED,
    DrainState.FAILED,
)
