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


ACTIVE_DRAIN_STATES = (DrainState.PLANNING, DrainState.RUNNING, DrainState.CANCELLING)
FINISHED_DRAIN_STATES = (
    DrainState.COMPLETED,
    DrainState.INCOMPLETE,
    DrainState.CANCELLED,
    DrainState.FAILED,
)
