"""A restarted coordinator's decisions, over every combination of what the journal holds,
what the cloud says and where the VM runs."""

from __future__ import annotations

import itertools

import pytest

from hostmaint.coordinator import reconcile
from hostmaint.coordinator.drivers.base import (
    MigrationKind,
    MigrationRef,
    MigrationState,
    MigrationStatus,
)
from hostmaint.coordinator.reconcile import Decision, Verdict
from hostmaint.coordinator.states import VmState

SOURCE = "src"
HOSTS = (None, SOURCE, "dst", "elsewhere")  # where the VM runs (None: unknown)
RUNNING = tuple(s for s in MigrationState if not s.finished)
FINISHED = tuple(s for s in MigrationState if s.finished)


def record(state: MigrationState, dest: str | None = "dst") -> MigrationStatus:
    ref = MigrationRef("vm", 1, MigrationKind.LIVE)
    return MigrationStatus(
        ref, state, cloud_status=f"nova-{state}", source_host=SOURCE, dest_host=dest
    )


RECORDS = (None, *(record(s, d) for s in MigrationState for d in ("dst", None)))


def moved(host: str | None) -> bool:
    return host is not None and host != SOURCE


# ---- start intent ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("live", "row_state", "rec", "host", "expected"),
    [
        # the cloud's migration still runs: it started, to its destination or the planned one
        (True, VmState.MIGRATING, record(MigrationState.RUNNING), SOURCE, Verdict.STARTED),
        (False, VmState.MIGRATING, record(MigrationState.QUEUED), None, Verdict.STARTED),
        # ended, the VM elsewhere: it started (and its follower records the end)
        (True, VmState.MIGRATING, record(MigrationState.COMPLETED), "dst", Verdict.STARTED),
        (False, VmState.MIGRATING, record(MigrationState.FAILED), "dst", Verdict.STARTED),
        # ended, the VM still here or nowhere known: not started
        (True, VmState.MIGRATING, record(MigrationState.FAILED), SOURCE, Verdict.NOT_STARTED),
        (True, VmState.MIGRATING, record(MigrationState.COMPLETED), None, Verdict.NOT_STARTED),
        # no record, the VM elsewhere: a live start completed; a cold one awaits confirmation
        (True, VmState.MIGRATING, None, "dst", Verdict.COMPLETED),
        (False, VmState.MIGRATING, None, "dst", Verdict.NOT_STARTED),
        (True, VmState.QUEUED, None, "dst", Verdict.NOT_STARTED),
        (True, VmState.MIGRATING, None, SOURCE, Verdict.NOT_STARTED),
        (True, VmState.MIGRATING, None, None, Verdict.NOT_STARTED),
    ],
)
def test_a_start_intent_examples(
    live: bool, row_state: VmState, rec: MigrationStatus | None, host: str | None, expected: Verdict
) -> None:
    got = reconcile.start_intent(
        live=live, row_state=row_state, record=rec, host=host, source=SOURCE, planned_target="plan"
    )
    assert got.verdict is expected


@pytest.mark.parametrize(
    ("live", "row_state", "rec", "host"),
    itertools.product((True, False), tuple(VmState), RECORDS, HOSTS),
)
def test_a_start_intent_every_case(
    live: bool, row_state: VmState, rec: MigrationStatus | None, host: str | None
) -> None:
    got = reconcile.start_intent(
        live=live, row_state=row_state, record=rec, host=host, source=SOURCE, planned_target="plan"
    )
    if rec is not None and (not rec.state.finished or moved(host)):
        assert got == Decision(
            Verdict.STARTED, rec.dest_host or "plan", "started before the restart"
        )
    elif live and moved(host) and row_state is VmState.MIGRATING:
        assert got == Decision(
            Verdict.COMPLETED, host, f"started before the restart; runs on {host}"
        )
    else:
        assert got == Decision(Verdict.NOT_STARTED, note="not started before the restart")


# ---- confirm intent ----------------------------------------------------------------------


@pytest.mark.parametrize("rec", RECORDS)
def test_a_confirmation_arrived_unless_the_cloud_still_waits_or_cannot_tell(
    rec: MigrationStatus | None,
) -> None:
    got = reconcile.confirm_intent(rec)
    waiting = rec is None or rec.state in (MigrationState.AWAITING_CONFIRM, MigrationState.UNKNOWN)
    if waiting:
        assert got == Decision(Verdict.NOT_CONFIRMED, note="not confirmed before the restart")
    else:
        assert rec is not None
        assert got.verdict is Verdict.CONFIRMED
        assert got.note == f"confirmed before the restart (nova-{rec.state})"


# ---- dispatched, start never journaled ---------------------------------------------------


@pytest.mark.parametrize(
    ("cold", "running", "host", "expected"),
    [
        (False, False, None, Verdict.NOT_STARTED),
        (False, False, SOURCE, Verdict.NOT_STARTED),
        (False, False, "dst", Verdict.COMPLETED),
        (False, True, None, Verdict.STARTED),
        (False, True, SOURCE, Verdict.STARTED),
        (False, True, "dst", Verdict.COMPLETED),  # live and moved: done, whatever runs
        (True, False, None, Verdict.NOT_STARTED),
        (True, False, SOURCE, Verdict.NOT_STARTED),
        (True, False, "dst", Verdict.COMPLETED),
        (True, True, None, Verdict.STARTED),
        (True, True, SOURCE, Verdict.STARTED),
        (True, True, "dst", Verdict.STARTED),  # a cold migration moves before it is confirmed
    ],
)
def test_an_unjournaled_start_every_case(
    cold: bool, running: bool, host: str | None, expected: Verdict
) -> None:
    got = reconcile.unstarted(cold=cold, running=running, host=host, source=SOURCE)
    assert got == Decision(expected)


# ---- a journaled start --------------------------------------------------------------------


@pytest.mark.parametrize(("cold", "rec"), itertools.product((True, False), RECORDS))
def test_a_journaled_start_is_followed_unless_the_cloud_says_it_ended(
    cold: bool, rec: MigrationStatus | None
) -> None:
    got = reconcile.journaled_start(cold=cold, record=rec)
    if not cold and rec is not None and rec.state.finished:
        assert got == Decision(Verdict.ENDED)
    else:
        assert got == Decision(Verdict.STARTED)


# ---- ended unfollowed ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "dest", "host", "row_target"),
    itertools.product(FINISHED, ("dst", None), HOSTS, ("target", None)),
)
def test_an_ended_migration_every_case(
    state: MigrationState, dest: str | None, host: str | None, row_target: str | None
) -> None:
    got = reconcile.ended(
        record=record(state, dest), host=host, source=SOURCE, row_target=row_target
    )
    if state is MigrationState.COMPLETED or moved(host):
        assert got == Decision(Verdict.COMPLETED, dest or host or row_target)
    else:
        assert got == Decision(Verdict.FAILED, note=f"migration {state} during a restart")


def test_an_ended_migration_examples() -> None:
    failed = record(MigrationState.FAILED)
    assert reconcile.ended(record=failed, host=SOURCE, source=SOURCE, row_target=None).verdict is (
        Verdict.FAILED
    )
    # failed in the cloud's books, yet the VM runs elsewhere: it moved
    assert reconcile.ended(
        record=record(MigrationState.ERROR, None), host="b", source=SOURCE, row_target="t"
    ) == Decision(Verdict.COMPLETED, "b")
    assert reconcile.ended(
        record=record(MigrationState.COMPLETED, None), host=None, source=SOURCE, row_target="t"
    ) == Decision(Verdict.COMPLETED, "t")


# ---- queued ------------------------------------------------------------------------------


@pytest.mark.parametrize("host", HOSTS)
def test_a_queued_vm_that_left_the_host_is_done(host: str | None) -> None:
    expected = Verdict.COMPLETED if moved(host) else Verdict.UNCHANGED
    assert reconcile.queued(host, SOURCE) == Decision(expected)


@pytest.mark.parametrize(
    ("holder_running", "hold_done", "verdict"),
    [
        (True, True, Verdict.HELD),
        (True, False, Verdict.RELEASED),  # killed inside the hold: some caps may be missing
        (False, True, Verdict.RELEASED),  # its holder ended: the others get the link back
        (False, False, Verdict.RELEASED),
    ],
)
def test_a_burst_left_goes_on_only_when_its_hold_is_known_and_its_holder_runs(
    holder_running: bool, hold_done: bool, verdict: Verdict
) -> None:
    decision = reconcile.burst_left(holder_running=holder_running, hold_done=hold_done)
    assert decision.verdict is verdict
    assert decision.note
