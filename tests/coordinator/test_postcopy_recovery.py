"""A post-copy whose link breaks after the switch, on a simulated cloud.

The one guest writes faster than any downtime limit allows and post-copy is allowed,
so its ladder ends in a post-copy switch; the cloud (`SimDriver(postcopy_cuts=...)`)
then breaks the link, for a while or for good, as libvirt 8.5+ leaves such a
migration: paused on both hosts, resumable once the link is back. The coordinator must
show the pause (journal, GetDrain, events) while it lasts, resume it with backoff,
never abort it, and when the target is gone say so plainly and never count the VM as
moved. tests/lab/test_postcopy_recovery.py does the same with real QEMU.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hostmaint.coordinator import pcrecovery
from hostmaint.coordinator.drivers.base import TargetHalf
from hostmaint.coordinator.executor import Executor, ExecutorSettings
from hostmaint.coordinator.journal import Journal, make_engine
from hostmaint.coordinator.model import GIB, DrainPolicy
from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import coordinator_pb2 as cpb
from tests.coordinator.onevm import LINK_BYTES_PER_S, SOURCE, TARGET, one_vm_cloud
from tests.coordinator.simagents import Guest, SimAgent, SimAgents
from tests.coordinator.simdriver import SimDriver

VM = "writer"
GUEST = Guest(2 * GIB, 1 * GIB, rate_bytes_per_s=4 * GIB)
POLICY = cpb.DrainPolicy(allow_postcopy=True)
WAIT_S = 60.0
Ev = cpb.DrainEventKind


@dataclass
class Run:
    driver: SimDriver
    journal: Journal
    executor: Executor
    drain_id: str
    events: list[cpb.DrainEvent] = field(default_factory=list)
    # (VM state in GetDrain, its error) each time GetDrain was read during the pause
    seen_paused: list[tuple[int, str]] = field(default_factory=list)
    # whether the run knew from the watch, then, that the VM left pre-copy (whoever
    # switched it: dispatch counts no need of it)
    seen_in_postcopy: list[bool] = field(default_factory=list)

    def kinds(self) -> list[int]:
        return [
            e.kind
            for e in self.events
            if e.vm_uuid == VM and e.kind != Ev.DRAIN_EVENT_KIND_PROGRESS
        ]


@pytest.fixture
def stopped() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


def _cloud(cut_s: float | None, target_lost: bool = False) -> tuple[SimDriver, SimAgents]:
    return one_vm_cloud(
        VM, GUEST, postcopy_cuts={VM: cut_s}, target_lost={VM} if target_lost else ()
    )


def _executor(
    driver: SimDriver,
    agents: SimAgents,
    journal: Journal,
    stopped: threading.Event,
    deadline_s: float,
) -> Executor:
    settings = ExecutorSettings(
        defaults=DrainPolicy(),
        link_bandwidth_bytes_per_s=LINK_BYTES_PER_S,
        watch_start_timeout_s=0.5,
        escalation_settle_s=0.3,
        stall_grace_s=0.5,
        postcopy_resume_first_s=0.1,
        postcopy_resume_max_s=0.4,
        postcopy_recovery_deadline_s=deadline_s,
    )
    registry: Any = agents
    return Executor(driver, registry, journal, settings, clock=time.time, stopped=stopped)


def _drain(
    tmp_path: Path,
    stopped: threading.Event,
    *,
    cut_s: float | None,
    deadline_s: float = 20.0,
    target_lost: bool = False,
    cancel_when_paused: bool = False,
) -> Run:
    driver, agents = _cloud(cut_s, target_lost)
    journal = Journal(make_engine(f"sqlite:///{tmp_path / 'journal.db'}"), clock=time.time)
    executor = _executor(driver, agents, journal, stopped, deadline_s)
    drain_id = executor.start_drain(SOURCE, POLICY, "firmware")
    run = Run(driver, journal, executor, drain_id)
    for event in executor.events(drain_id, stopped.is_set):
        run.events.append(event)
        if event.vm_uuid == VM and event.vm.state == cpb.VM_STATE_POSTCOPY_PAUSED:
            vm = next(v for v in executor.status(drain_id).vms if v.vm_uuid == VM)
            run.seen_paused.append((vm.state, vm.error))
            run.seen_in_postcopy.append(VM in executor._runs[drain_id].in_postcopy)
            if cancel_when_paused and len(run.seen_paused) == 1:
                executor.cancel(drain_id, abort_running=True)
        if event.kind == Ev.DRAIN_EVENT_KIND_FINISHED:
            break
    assert executor.wait(drain_id, WAIT_S), "the drain did not end"
    return run


def test_a_short_cut_is_resumed_and_the_vm_moves(tmp_path: Path, stopped: threading.Event) -> None:
    run = _drain(tmp_path, stopped, cut_s=0.6)
    status = run.executor.status(run.drain_id)
    vm = status.vms[0]
    assert (status.state, vm.state) == (cpb.DRAIN_STATE_COMPLETED, cpb.VM_STATE_COMPLETED)
    assert run.driver.placement()[VM] == TARGET
    # the pause was shown, then the resume
    kinds = run.kinds()
    assert (
        kinds.index(Ev.DRAIN_EVENT_KIND_POSTCOPY_PAUSED)
        < kinds.index(Ev.DRAIN_EVENT_KIND_POSTCOPY_RESUMED)
        < kinds.index(Ev.DRAIN_EVENT_KIND_MIGRATION_COMPLETED)
    )
    assert run.seen_paused and all(s == cpb.VM_STATE_POSTCOPY_PAUSED for s, _ in run.seen_paused)
    assert all(run.seen_in_postcopy)
    assert f"post-copy to {TARGET} broke" in run.seen_paused[0][1]
    # tried while the link was down (refused), with growing waits, then taken
    tries = run.driver.resume_tries
    assert [t for _, _, t in tries] == [False] * (len(tries) - 1) + [True], tries
    waits = [b - a for (_, a, _), (_, b, _) in itertools.pairwise(tries)]
    assert len(waits) >= 2, tries
    for n, wait in enumerate(waits, start=1):  # no sooner than the backoff allows (less
        # the journal write before each call, which varies)
        assert wait >= pcrecovery.resume_wait_s(n, 0.1, 0.4) - 0.05, waits
    steps = [s.action for s in run.journal.steps(run.drain_id) if s.vm_uuid == VM]
    assert "postcopy_paused" in steps and steps.count("resume_postcopy") == len(tries)
    assert run.driver.aborts_in_postcopy == []
    assert not [s for s in steps if s == "abort"]


def test_a_target_gone_for_good_is_reported_plainly_and_never_as_moved(
    tmp_path: Path, stopped: threading.Event
) -> None:
    run = _drain(tmp_path, stopped, cut_s=None, deadline_s=1.5)
    status = run.executor.status(run.drain_id)
    vm = status.vms[0]
    assert (status.state, vm.state) == (cpb.DRAIN_STATE_INCOMPLETE, cpb.VM_STATE_STRANDED)
    assert (status.summary.migrated, status.summary.stranded) == (0, 1)
    assert run.driver.placement()[VM] == SOURCE  # the cloud never saw it move
    assert Ev.DRAIN_EVENT_KIND_MIGRATION_COMPLETED not in run.kinds()
    stranded = [e for e in run.events if e.kind == Ev.DRAIN_EVENT_KIND_STRANDED]
    assert len(stranded) == 1
    message = stranded[0].message
    assert "runs nowhere" in message and SOURCE in message and TARGET in message
    assert "Not moved" in message and vm.error == message
    # the journal says what is left, and that it was tried until the deadline
    steps = run.journal.steps(run.drain_id)
    last = [s for s in steps if s.action == "stranded"]
    assert len(last) == 1 and last[0].detail == {"source": SOURCE, "target": TARGET}
    assert last[0].result == message
    assert len(run.driver.resume_tries) >= 3
    assert not any(taken for _, _, taken in run.driver.resume_tries)
    assert run.driver.aborts_in_postcopy == []
    assert [s.action for s in steps if s.vm_uuid == VM].count("start_migration") == 1


def test_a_target_that_lost_the_guest_is_reported_at_once(
    tmp_path: Path, stopped: threading.Event
) -> None:
    run = _drain(tmp_path, stopped, cut_s=0.1, deadline_s=30.0, target_lost=True)
    vm = run.executor.status(run.drain_id).vms[0]
    assert vm.state == cpb.VM_STATE_STRANDED
    assert f"{TARGET} has no copy of the VM any more" in vm.error
    assert f"its copy on {TARGET} is gone" in vm.error
    # long before the deadline: two looks at the target, one resume between them
    assert len(run.driver.resume_tries) <= 2


def test_a_cancel_with_abort_never_aborts_a_paused_postcopy(
    tmp_path: Path, stopped: threading.Event
) -> None:
    run = _drain(tmp_path, stopped, cut_s=None, deadline_s=1.5, cancel_when_paused=True)
    status = run.executor.status(run.drain_id)
    assert status.vms[0].state == cpb.VM_STATE_STRANDED
    assert run.driver.aborts_in_postcopy == []
    assert not [s for s in run.journal.steps(run.drain_id) if s.action == "abort"]


def test_resume_waits_double_up_to_their_cap() -> None:
    waits = [pcrecovery.resume_wait_s(n, 2.0, 30.0) for n in range(7)]
    assert waits == [0.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert pcrecovery.resume_wait_s(10_000, 2.0, 30.0) == 30.0


def test_the_halves_are_named() -> None:
    gone = pcrecovery.halves("vm1", "h0", "h1", TargetHalf.GONE)
    assert "its copy on h1 is gone" in gone and "h0 holds it paused" in gone
    there = pcrecovery.halves("vm1", "h0", "h1", TargetHalf.UNREACHABLE)
    assert "on h1 (unreachable)" in there and "on h0, where it is paused" in there


def test_a_restarted_coordinator_follows_and_resumes_a_paused_postcopy(tmp_path: Path) -> None:
    driver, agents = _cloud(cut_s=1.5)
    journal = Journal(make_engine(f"sqlite:///{tmp_path / 'journal.db'}"), clock=time.time)
    first_stopped, second_stopped = threading.Event(), threading.Event()
    first = _executor(driver, agents, journal, first_stopped, deadline_s=20.0)
    drain_id = first.start_drain(SOURCE, POLICY, "firmware")
    try:
        for event in first.events(drain_id, first_stopped.is_set):
            if event.kind == Ev.DRAIN_EVENT_KIND_POSTCOPY_PAUSED:
                break
        first_stopped.set()  # the coordinator dies while the post-copy is paused
        stopped_at = time.monotonic()
        assert journal.vm(drain_id, VM).state == "postcopy_paused"
        second = _executor(driver, agents, journal, second_stopped, deadline_s=20.0)
        assert second.resume_all() == [drain_id]
        assert second.wait(drain_id, WAIT_S), "the resumed drain did not end"
        status = second.status(drain_id)
    finally:
        first_stopped.set()
        second_stopped.set()
    assert (status.state, status.vms[0].state) == (
        cpb.DRAIN_STATE_COMPLETED,
        cpb.VM_STATE_COMPLETED,
    )
    assert driver.placement()[VM] == TARGET
    assert driver.migrations_started == 1 and driver.aborts_in_postcopy == []
    (_, at, taken) = driver.resume_tries[-1]
    assert taken and at > stopped_at  # resumed by the restarted coordinator


class LateErrorAgents(SimAgents):
    """Agents whose watch ends a resumed post-copy with an error although it completed
    (libvirt's resume call can fail after the end, seen in the lab)."""

    def client(self, host: str) -> SimAgent:
        return LateErrorAgent(self, host)


class LateErrorAgent(SimAgent):
    def watch(
        self, uuid: str, interval_s: float, start_timeout_s: float, deadline_s: float
    ) -> Iterator[apb.MigrationProgress]:
        for p in super().watch(uuid, interval_s, start_timeout_s, deadline_s):
            if p.final:
                p = apb.MigrationProgress(
                    domain_uuid=uuid, phase=apb.MIGRATION_PHASE_FAILED, final=True, error="lost"
                )
            yield p


def test_a_paused_postcopy_whose_watch_ends_in_error_but_moved_is_reported_moved(
    tmp_path: Path, stopped: threading.Event
) -> None:
    driver, _ = _cloud(cut_s=0.3)
    driver.resume_tail_s = 0.0  # it ends at once: no post-copy sample after the pause
    agents = LateErrorAgents(
        driver, {VM: GUEST}, LINK_BYTES_PER_S, no_cpu_controller={SOURCE}, sample_interval_s=0.02
    )
    journal = Journal(make_engine(f"sqlite:///{tmp_path / 'journal.db'}"), clock=time.time)
    executor = _executor(driver, agents, journal, stopped, deadline_s=20.0)
    drain_id = executor.start_drain(SOURCE, POLICY, "firmware")
    assert executor.wait(drain_id, WAIT_S), "the drain did not end"
    status = executor.status(drain_id)
    assert (status.state, status.vms[0].state) == (
        cpb.DRAIN_STATE_COMPLETED,
        cpb.VM_STATE_COMPLETED,
    )
    assert driver.placement()[VM] == TARGET
    assert not [s for s in journal.steps(drain_id) if s.action == "stranded"]
    kinds = [e.kind for e in executor.events(drain_id, stopped.is_set) if e.vm_uuid == VM]
    assert kinds.index(Ev.DRAIN_EVENT_KIND_POSTCOPY_PAUSED) < kinds.index(
        Ev.DRAIN_EVENT_KIND_POSTCOPY_RESUMED
    )
