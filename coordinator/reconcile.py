"""What a restarted coordinator makes of each VM of a drain (pure: no I/O, no clock).

Each function takes what the journal holds of one VM (its row's state, an open
intent), what the cloud says of its latest migration (``MigrationStatus``, None
when there is none or the cloud cannot tell) and where the VM runs now (None when
unknown), and returns a ``Decision``; ``restart.Restart`` reads the world, asks,
and journals the answer. A VM counts as moved only when it is known to run on a
host other than the drained one.

- ``start_intent``: a start journaled as intended, with no outcome.
- ``confirm_intent``: a cold migration's confirmation intended, with no outcome.
- ``unstarted``: a VM dispatched whose start was never journaled.
- ``journaled_start``: a VM whose migration was journaled as started.
- ``ended``: a migration that ended while no coordinator followed it.
- ``queued``: a VM still waiting for its turn.
- ``burst_left``: a burst (one migration holding the link) the previous coordinator
  left in force.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from hostmaint.coordinator.drivers.base import MigrationState, MigrationStatus
from hostmaint.coordinator.states import VmState


class Verdict(enum.StrEnum):
    STARTED = "started"  # a migration runs (or ran) for the VM: follow it
    COMPLETED = "completed"  # the VM runs elsewhere: it is done
    FAILED = "failed"  # its migration ended without moving it
    NOT_STARTED = "not_started"  # nothing happened: it runs again in its turn
    ENDED = "ended"  # its migration ended while no one followed it: see ``ended``
    CONFIRMED = "confirmed"
    NOT_CONFIRMED = "not_confirmed"
    UNCHANGED = "unchanged"  # nothing to do
    HELD = "held"  # a burst goes on: its holder's ladder releases it in its time
    RELEASED = "released"  # a burst is undone now: limits and caps given back


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    target_host: str | None = None  # where it went (STARTED, COMPLETED), when known
    note: str = ""  # why, for the journal


def _elsewhere(host: str | None, source: str) -> bool:
    return host is not None and host != source


def start_intent(
    *,
    live: bool,
    row_state: VmState,
    record: MigrationStatus | None,
    host: str | None,
    source: str,
    planned_target: str | None,
) -> Decision:
    """A start with no outcome: it happened if the cloud's latest migration still runs, or
    ended with the VM elsewhere; a live one also if the VM runs elsewhere though the cloud
    keeps no record (it ended with the process that watched it). A cold migration that
    moved still waits for its confirmation: not that shortcut."""
    if record is not None and (not record.state.finished or _elsewhere(host, source)):
        return Decision(
            Verdict.STARTED, record.dest_host or planned_target, "started before the restart"
        )
    if live and _elsewhere(host, source) and row_state == VmState.MIGRATING:
        return Decision(Verdict.COMPLETED, host, f"started before the restart; runs on {host}")
    return Decision(Verdict.NOT_STARTED, note="not started before the restart")


def confirm_intent(record: MigrationStatus | None) -> Decision:
    """A confirmation with no outcome: it arrived unless the cloud's record still waits
    for one (or cannot tell). Either way the follower re-reads the record and confirms
    only a migration still waiting."""
    if record is None or record.state in (
        MigrationState.AWAITING_CONFIRM,
        MigrationState.UNKNOWN,
    ):
        return Decision(Verdict.NOT_CONFIRMED, note="not confirmed before the restart")
    return Decision(Verdict.CONFIRMED, note=f"confirmed before the restart ({record.cloud_status})")


def unstarted(*, cold: bool, running: bool, host: str | None, source: str) -> Decision:
    """Dispatched, but the coordinator stopped before the start was journaled. `running`:
    the cloud runs a migration of the VM. A cold migration moves the VM before it is
    confirmed, so its running migration comes first; a live one that moved is done."""
    if cold and running:
        return Decision(Verdict.STARTED)
    if _elsewhere(host, source):
        return Decision(Verdict.COMPLETED)
    if running:
        return Decision(Verdict.STARTED)
    return Decision(Verdict.NOT_STARTED)


def journaled_start(*, cold: bool, record: MigrationStatus | None) -> Decision:
    """A migration journaled as started: followed again (a cold one by its own follower,
    which reads the cloud's record), unless the cloud says it ended."""
    if not cold and record is not None and record.state.finished:
        return Decision(Verdict.ENDED)
    return Decision(Verdict.STARTED)


def ended(
    *, record: MigrationStatus, host: str | None, source: str, row_target: str | None
) -> Decision:
    """A migration that ended unfollowed: completed if the cloud says so or the VM runs
    elsewhere; failed otherwise (and retried as any)."""
    if record.state is not MigrationState.COMPLETED and not _elsewhere(host, source):
        return Decision(Verdict.FAILED, note=f"migration {record.state} during a restart")
    return Decision(Verdict.COMPLETED, record.dest_host or host or row_target)


def queued(host: str | None, source: str) -> Decision:
    """A queued VM that left the host meanwhile is done."""
    if _elsewhere(host, source):
        return Decision(Verdict.COMPLETED)
    return Decision(Verdict.UNCHANGED)


def burst_left(*, holder_running: bool, hold_done: bool) -> Decision:
    """A burst the journal shows in force (a hold with no release): it goes on where the
    hold is known to have been carried out (every neighbour capped, the holder's limit
    raised) and its holder still migrates; the holder's ladder then releases it when its
    window ends, as it would have with no restart, and a burst that outlived its window
    meanwhile is released at the holder's first sample. Otherwise it is undone now: a
    hold of unknown outcome may have capped only some neighbours, and a holder that
    ended has nothing left to hold the link for."""
    if holder_running and hold_done:
        return Decision(Verdict.HELD, note="the burst goes on after the restart")
    why = "its holder ended" if not holder_running else "its hold's outcome is unknown"
    return Decision(Verdict.RELEASED, note=f"the burst is released after the restart: {why}")
