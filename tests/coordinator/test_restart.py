"""A drain whose coordinator stops mid-migration, resumed by a new one on the same journal.

The cloud is `SimDriver` and its agents `SimAgents` (in process, every call
recorded). Four guests on `src`: a writer faster than the link (its 800 MiB set
found by the 1 s window), planned for post-copy once pre-copy had its rounds
after the first pass, and three slow writers. Two migrate at a time, so when the
first coordinator stops, the fast writer and one slow writer are migrating and
two are queued.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from hostmaint.coordinator.drivers.base import Instance, InstanceState
from hostmaint.coordinator.executor import Executor, ExecutorSettings
from hostmaint.coordinator.journal import (
    STEP_DONE,
    STEP_INTENT,
    Journal,
    StepRow,
    drain_vms,
    make_engine,
    steps,
)
from hostmaint.coordinator.model import GIB, MIB, DrainPolicy, Link
from hostmaint.protos import coordinator_pb2 as cpb
from tests.coordinator.simagents import Guest, SimAgents
from tests.coordinator.simdriver import SimDriver, SimHost

LINK_BYTES_PER_S = 1.25e9
SOURCE = "src"
FAST, A, B, C = "fast", "a", "b", "c"
GUESTS = {
    FAST: Guest(4 * GIB, 2 * GIB, rate_bytes_per_s=8 * GIB, working_set_bytes=800 * MIB),
    A: Guest(16 * GIB, 1 * GIB, rate_bytes_per_s=10 * MIB),
    B: Guest(8 * GIB, 1 * GIB, rate_bytes_per_s=5 * MIB),
    C: Guest(16 * GIB, 2 * GIB, rate_bytes_per_s=5 * MIB),
}
POLICY = cpb.DrainPolicy(allow_postcopy=True, max_parallel_per_source=2)
POLL_S = 0.02  # the agents' sampling (the coordinator's interval stays its default)
WAIT_S = 15.0
SETTLE_S = 0.5  # the time a step of the ladder gets before the next


def wait_until(what: str, condition: Callable[[], object], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(POLL_S / 2)


class Clock:
    """Wall time, moved on by `skip` (an outage the test does not wait out) and stopped
    by `freeze` until `thaw` (so that no step of the ladder falls due meanwhile)."""

    def __init__(self) -> None:
        self.offset_s = 0.0
        self.frozen_at: float | None = None

    def skip(self, seconds: float) -> None:
        self.offset_s += seconds

    def freeze(self) -> None:
        self.frozen_at = self()

    def thaw(self) -> None:
        self.frozen_at = None

    def __call__(self) -> float:
        if self.frozen_at is not None:
            return self.frozen_at
        return time.time() + self.offset_s


@dataclass
class World:
    db_url: str
    driver: SimDriver
    agents: SimAgents
    clock: Clock
    stops: list[threading.Event] = field(default_factory=list)

    def executor(self) -> tuple[Executor, Journal]:
        """A coordinator's executor on the drain journal (a new process after a restart)."""
        stopped = threading.Event()
        self.stops.append(stopped)
        journal = Journal(make_engine(self.db_url), clock=self.clock)
        settings = ExecutorSettings(
            defaults=DrainPolicy(),
            link_bandwidth_bytes_per_s=LINK_BYTES_PER_S,
            watch_start_timeout_s=0.5,
            escalation_settle_s=SETTLE_S,
        )
        registry: Any = self.agents  # the registry's contract, in process
        executor = Executor(
            self.driver, registry, journal, settings, clock=self.clock, stopped=stopped
        )
        return executor, journal

    def stop(self, executor: Executor, drain_id: str) -> None:
        """The coordinator goes away mid-drain: its threads end, the journal stays."""
        self.stops[-1].set()
        assert executor.wait(drain_id, WAIT_S)
        prefix = f"migwatch/{drain_id[:8]}"
        wait_until(
            "the stopped coordinator's migration threads end",
            lambda: not [t for t in threading.enumerate() if t.name.startswith(prefix)],
        )

    def calls_since(self, mark: int, operation: str, vm: str | None = None) -> list[str]:
        return [
            c.detail
            for c in self.agents.calls[mark:]
            if c.operation == operation and (vm is None or c.vm == vm)
        ]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    hosts = [SimHost(h, 64 * 1024, 64) for h in (SOURCE, "t1", "t2")]
    instances = [
        Instance(u, u, SOURCE, "p", InstanceState.ACTIVE, None, "f", 2, g.memory_bytes // MIB)
        for u, g in GUESTS.items()
    ]
    driver = SimDriver(
        hosts,
        instances,
        clock=time.monotonic,
        link=Link(LINK_BYTES_PER_S),
        time_scale=0.01,
        precopy_never_ends={FAST, A},
    )
    clock = Clock()
    agents = SimAgents(
        driver,
        dict(GUESTS),
        LINK_BYTES_PER_S,
        clock=clock,
        no_cpu_controller={SOURCE},
        sample_interval_s=POLL_S,
    )
    w = World(f"sqlite:///{tmp_path / 'journal.db'}", driver, agents, clock)
    try:
        yield w
    finally:
        for stopped in w.stops:
            stopped.set()


def _planned(plan: cpb.DrainPlan) -> dict[str, cpb.PlannedMigration]:
    return {m.vm_uuid: m for m in plan.migrations}


def _switched_as_planned(journal: Journal, drain_id: str) -> None:
    """FAST's ladder took the plan's switch to post-copy, once its pre-copy rounds were
    spent, and nothing else but a burst before it (where the link was shared then): no
    raise, no throttle, no abort."""
    tunes = [s for s in journal.steps(drain_id) if s.action == "tune" and s.vm_uuid == FAST]
    taken = [str(s.detail["action"]).partition("=")[0] for s in tunes]
    assert set(taken) <= {"hold_link", "release_link", "postcopy"}, taken
    assert (taken[-1], tunes[-1].state, tunes[-1].detail["reason"]) == (
        "postcopy",
        STEP_DONE,
        "planned: post-copy, pre-copy did not converge in 2 rounds after the first pass",
    )
    assert journal.vm(drain_id, FAST).tuning_applied[-1] == "postcopy"


def _started(world: World) -> tuple[Executor, Journal, str, cpb.DrainPlan]:
    """A drain started, with FAST and A migrating and B and C queued."""
    first, journal = world.executor()
    drain_id = first.start_drain(SOURCE, POLICY, "firmware")
    wait_until(
        "FAST and A migrate",
        lambda: world.agents.called("WatchMigration", FAST)
        and world.agents.called("WatchMigration", A),
    )
    plan = first.status(drain_id).plan
    order = [m.vm_uuid for m in sorted(plan.migrations, key=lambda m: m.position)]
    fast = _planned(plan)[FAST]
    # what this scenario is about: the fast writer first, post-copy after two rounds
    assert order == [FAST, A, C, B]
    assert (fast.tuning, fast.precopy_tries) == (cpb.TUNING_POSTCOPY, 2)
    assert fast.burst_s > 0
    return first, journal, drain_id, plan


def _start_and_stop(world: World) -> tuple[str, cpb.DrainPlan]:
    """A drain started, stopped with FAST past its first pass (its pre-copy rounds left)
    and A migrating, B and C queued; the plan it journaled."""
    first, journal, drain_id, plan = _started(world)
    world.agents.set_round(FAST, 2)  # its first pass is done; two rounds to go
    time.sleep(10 * POLL_S)
    world.stop(first, drain_id)
    rows = {r.vm_uuid: r for r in journal.vms(drain_id)}
    assert {u: r.state for u, r in rows.items()} == {
        FAST: "migrating",
        A: "migrating",
        B: "queued",
        C: "queued",
    }
    assert rows[FAST].tuning_applied == ()  # nothing was due yet
    return drain_id, plan


def test_a_restarted_coordinator_resumes_the_plan_it_journaled(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """The new coordinator adopts the running migrations at once, without measuring; the
    fast writer keeps its planned switch (post-copy once its two rounds are spent: no
    abort, no throttle); A, which ended during the outage, is recorded without being
    tuned; B and C start once each, in the planned order, to their planned targets, with
    their planned settings, although B writes faster now than when it was planned."""
    drain_id, plan = _start_and_stop(world)
    world.driver.complete(A)  # A's migration ends while no coordinator watches
    world.agents.guests[B] = replace(GUESTS[B], rate_bytes_per_s=900 * MIB)
    mark = len(world.agents.calls)

    second, journal = world.executor()
    resumed_at = time.monotonic()
    assert second.resume_all() == [drain_id]
    wait_until("FAST adopted", lambda: world.calls_since(mark, "WatchMigration", FAST), timeout_s=5)
    adopted_s = time.monotonic() - resumed_at
    assert world.calls_since(mark, "MeasureDirtyRate") == []
    assert adopted_s < 3.0
    world.agents.set_round(FAST, 3)
    time.sleep(10 * POLL_S)
    assert journal.vm(drain_id, FAST).tuning_applied == ()  # one round still to go
    world.agents.set_round(FAST, 4)
    assert second.wait(drain_id, WAIT_S)

    assert journal.drain(drain_id).state == "completed"
    rows = {r.vm_uuid: r for r in journal.vms(drain_id)}
    assert {u: r.state for u, r in rows.items()} == dict.fromkeys(GUESTS, "completed")
    _switched_as_planned(journal, drain_id)
    assert not [d for d in world.calls_since(mark, "TuneMigration", FAST) if "throttle" in d]
    assert world.calls_since(mark, "TuneMigration", A) == []
    assert rows[A].target_host == _planned(plan)[A].target_host
    assert world.calls_since(mark, "MeasureDirtyRate") == []
    # each VM started once; the queued ones in the planned order, targets and settings
    starts = world.driver.starts()
    assert [s.instance_uuid for s in starts] == [FAST, A, C, B]
    planned = _planned(plan)
    for s in starts:
        assert s.target == planned[s.instance_uuid].target_host, s
        assert s.options.max_downtime_ms == planned[s.instance_uuid].qemu_max_downtime_ms, s
    assert world.driver.placement() == {u: planned[u].target_host for u in GUESTS}
    assert "cannot reset the migration" not in caplog.text


def test_an_adopted_migration_is_timed_from_its_start_not_from_the_restart(
    world: World,
) -> None:
    """Killed between journaling FAST's start and its outcome, the coordinator is back 40 s
    later: the migration it finds running started when the intent was journaled, so it is
    behind its prediction (28 s allowed) and its ladder moves it on at once, to the
    post-copy the plan permits (no throttle: the source cannot), although the rounds its
    plan gave pre-copy are not spent."""
    drain_id, _ = _start_and_stop(world)
    engine = sa.create_engine(world.db_url)
    with engine.begin() as conn:  # as a coordinator killed inside the start call leaves it
        (intent,) = conn.execute(
            sa.select(steps.c.id, steps.c.at).where(
                (steps.c.action == "start_migration") & (steps.c.vm_uuid == FAST)
            )
        ).all()
        conn.execute(
            steps.update()
            .where(steps.c.id == intent.id)
            .values(state=STEP_INTENT, done_at=None, result="")
        )
        conn.execute(
            drain_vms.update()
            .where(drain_vms.c.vm_uuid == FAST)
            .values(migration_ref="", started_at=None, attempts=0)
        )
    engine.dispose()
    world.clock.skip(40.0)
    restarted_at = world.clock()

    second, journal = world.executor()
    assert second.resume_all() == [drain_id]
    wait_until("FAST switched", lambda: journal.vm(drain_id, FAST).state == "completed")
    row = journal.vm(drain_id, FAST)
    assert row.started_at == pytest.approx(intent.at)
    assert row.attempts == 1
    tunes = [s for s in journal.steps(drain_id) if s.action == "tune" and s.vm_uuid == FAST]
    taken = [str(s.detail["action"]).partition("=")[0] for s in tunes]
    assert set(taken) <= {"raise_downtime", "hold_link", "release_link", "postcopy"}, taken
    assert (taken[-1], tunes[-1].state) == ("postcopy", STEP_DONE)
    first = tunes[0]
    assert first.at >= restarted_at
    elapsed_s = float(str(first.detail["reason"]).split("s > ")[0].removeprefix("elapsed "))
    assert elapsed_s >= 40.0, first.detail["reason"]
    assert second.wait(drain_id, WAIT_S)  # A, behind too, moves on as well
    assert journal.drain(drain_id).state == "completed"
    assert [s.instance_uuid for s in world.driver.starts()] == [FAST, A, C, B]


def test_a_journal_without_the_planned_settings_resumes_by_planning_again(
    world: World,
) -> None:
    """A drain journaled by a coordinator that kept no settings per VM (revision 0001):
    the new one plans afresh for them, then resumes as before."""
    drain_id, _ = _start_and_stop(world)
    engine = sa.create_engine(world.db_url)
    with engine.begin() as conn:
        conn.execute(drain_vms.update().values(planned=""))
    engine.dispose()
    mark = len(world.agents.calls)

    second, journal = world.executor()
    assert second.resume_all() == [drain_id]
    wait_until("FAST adopted", lambda: world.calls_since(mark, "WatchMigration", FAST))
    assert world.calls_since(mark, "MeasureDirtyRate")  # planned afresh
    world.driver.complete(FAST)
    world.driver.complete(A)
    assert second.wait(drain_id, WAIT_S)
    assert journal.drain(drain_id).state == "completed"
    assert [s.instance_uuid for s in world.driver.starts()] == [FAST, A, C, B]


def _stopped_in_a_burst(world: World) -> tuple[str, cpb.DrainPlan, StepRow]:
    """A drain stopped while FAST holds the link for its planned switch (A capped, its
    rounds spent); FAST's hold step."""
    first, journal, drain_id, plan = _started(world)
    world.clock.freeze()  # the burst does not end before the coordinator stops
    world.agents.set_round(FAST, 4)  # its rounds are spent: it holds the link, then switches
    wait_until(
        "FAST holds the link",
        lambda: any(t.startswith("hold_link=") for t in journal.vm(drain_id, FAST).tuning_applied),
    )
    world.stop(first, drain_id)
    world.clock.thaw()
    (hold,) = [s for s in journal.steps(drain_id) if s.action == "tune" and s.vm_uuid == FAST]
    assert hold.state == STEP_DONE
    assert hold.detail["restore_ms"] == _planned(plan)[FAST].qemu_max_downtime_ms
    return drain_id, plan, hold


def test_a_burst_in_force_when_the_coordinator_stopped_goes_on_to_its_planned_end(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """The coordinator stops while FAST holds the link (A capped): the next one takes the
    burst over as it stands (nothing tuned at the restart) and FAST's ladder releases it
    when its window ends, as with no restart: FAST's limit back to the one it had before,
    A's planned cap; then the planned post-copy switch. No second hold, no abort."""
    caplog.set_level(logging.INFO)
    drain_id, plan, hold = _stopped_in_a_burst(world)
    before_ms = _planned(plan)[FAST].qemu_max_downtime_ms
    mark = len(world.agents.calls)

    second, journal = world.executor()
    assert second.resume_all() == [drain_id]
    wait_until("FAST switched", lambda: journal.vm(drain_id, FAST).state == "completed")
    assert "the burst goes on after the restart" in caplog.text
    tunes = world.calls_since(mark, "TuneMigration", FAST)
    assert (
        tunes[0] == f'domain_uuid: "{FAST}" max_downtime_ms: {before_ms} lower_max_downtime: true'
    )
    assert world.calls_since(mark, "TuneMigration", A)[0] == (
        f'domain_uuid: "{A}" bandwidth_bytes_per_s: 0'
    )
    steps_fast = [s for s in journal.steps(drain_id) if s.action == "tune" and s.vm_uuid == FAST]
    release = steps_fast[1]
    assert str(release.detail["action"]) == f"release_link={before_ms}"
    # released by the ladder at the end of its window, not at the restart
    assert release.at - hold.at >= _planned(plan)[FAST].burst_s
    assert journal.vm(drain_id, FAST).tuning_applied == (
        hold.detail["action"],
        f"release_link={before_ms}",
        "postcopy",
    )
    world.driver.complete(A)
    assert second.wait(drain_id, WAIT_S)
    assert journal.drain(drain_id).state == "completed"
    assert not [s for s in journal.steps(drain_id) if str(s.detail.get("action")) == "abort"]
    assert [s.instance_uuid for s in world.driver.starts()] == [FAST, A, C, B]


@pytest.mark.parametrize("hold_cut_short", [False, True])
def test_a_neighbour_that_moved_during_the_outage_is_done_and_not_reset(
    world: World, caplog: pytest.LogCaptureFixture, hold_cut_short: bool
) -> None:
    """A, capped by FAST's burst, completes while no coordinator runs. The next one records
    it done from the cloud's word and never tunes it: neither when the burst goes on nor
    when it is undone (a hold whose outcome the journal does not know, as a coordinator
    killed inside it leaves it: FAST gets back the limit it had before, at once, and its
    ladder goes on after the burst: post-copy, no second hold)."""
    caplog.set_level(logging.INFO)
    drain_id, plan, hold = _stopped_in_a_burst(world)
    if hold_cut_short:
        engine = sa.create_engine(world.db_url)
        with engine.begin() as conn:
            conn.execute(
                steps.update()
                .where(steps.c.id == hold.id)
                .values(state=STEP_INTENT, done_at=None, result="")
            )
        engine.dispose()
    world.driver.complete(A)
    mark = len(world.agents.calls)

    second, journal = world.executor()
    assert second.resume_all() == [drain_id]
    assert second.wait(drain_id, WAIT_S)
    assert journal.drain(drain_id).state == "completed"
    row_a = journal.vm(drain_id, A)
    assert (row_a.state, row_a.attempts, row_a.target_host) == (
        "completed",
        1,
        _planned(plan)[A].target_host,
    )
    assert world.calls_since(mark, "TuneMigration", A) == []
    assert world.calls_since(mark, "WatchMigration", A) == []
    assert "cannot reset the migration" not in caplog.text
    events = second.status(drain_id)
    assert events.state == cpb.DRAIN_STATE_COMPLETED
    before_ms = _planned(plan)[FAST].qemu_max_downtime_ms
    first_tune = world.calls_since(mark, "TuneMigration", FAST)[0]
    if hold_cut_short:
        assert "the burst is released after the restart" in caplog.text
        assert first_tune == (
            f'domain_uuid: "{FAST}" max_downtime_ms: {before_ms} bandwidth_bytes_per_s: 0 '
            "lower_max_downtime: true"
        )
        assert journal.vm(drain_id, FAST).tuning_applied == (hold.detail["action"], "postcopy")
    else:
        assert first_tune == (
            f'domain_uuid: "{FAST}" max_downtime_ms: {before_ms} lower_max_downtime: true'
        )
    assert [s.instance_uuid for s in world.driver.starts()] == [FAST, A, C, B]


def test_an_adopted_migration_goes_on_up_its_ladder_within_what_the_source_can_do(
    world: World,
) -> None:
    """The coordinator is back 40 s after it stopped: A, adopted, is behind its prediction
    (its time counts from its start). Its ladder goes on without the step the source
    cannot take (no cgroup CPU controller, which the plan knew): at most a raise of its
    limit, then the post-copy switch the plan permits, no vCPU throttle."""
    drain_id, _ = _start_and_stop(world)
    world.clock.skip(40.0)
    mark, restarted_at = len(world.agents.calls), world.clock()

    second, journal = world.executor()
    assert second.resume_all() == [drain_id]
    wait_until("A switched", lambda: journal.vm(drain_id, A).state == "completed")
    steps_a = [s for s in journal.steps(drain_id) if s.action == "tune" and s.vm_uuid == A]
    taken = [str(s.detail["action"]).partition("=")[0] for s in steps_a]
    assert taken in (["postcopy"], ["raise_downtime", "postcopy"]), taken
    assert all(s.at >= restarted_at for s in steps_a)
    assert "allowed by the prediction" in steps_a[0].detail["reason"]
    for vm in (A, FAST):
        assert not [d for d in world.calls_since(mark, "TuneMigration", vm) if "throttle" in d]
    assert world.calls_since(mark, "MeasureDirtyRate") == []
    assert second.wait(drain_id, WAIT_S)
    assert journal.drain(drain_id).state == "completed"


@pytest.mark.parametrize(
    ("stopped_at_round", "then"),
    [(1, (2, 3, 4)), (3, (4,))],
    ids=["in-the-first-pass", "mid-rounds"],
)
def test_a_restart_at_any_point_of_the_rounds_keeps_the_planned_switch(
    world: World, stopped_at_round: int, then: tuple[int, ...]
) -> None:
    """Stopped while FAST copies its memory the first time, or with one of its two planned
    rounds spent: the next coordinator acts at once (it follows FAST within a second of
    its start, on the journal's clock, and measures nothing), FAST's ladder counts the
    job's own rounds (no switch before the planned round, whatever it saw before the
    restart) and switches to post-copy at the planned round: no raise, no throttle, no
    abort, no second attempt of any VM."""
    first, journal, drain_id, _ = _started(world)
    world.agents.set_round(FAST, stopped_at_round)
    time.sleep(10 * POLL_S)
    world.stop(first, drain_id)
    assert journal.vm(drain_id, FAST).tuning_applied == ()
    mark, restarted_at = len(world.agents.calls), world.clock()

    second, journal = world.executor()
    assert second.resume_all() == [drain_id]
    wait_until("FAST adopted", lambda: world.calls_since(mark, "WatchMigration", FAST))
    (watch, *_) = [c for c in world.agents.calls[mark:] if c.operation == "WatchMigration"]
    assert watch.at - restarted_at < 1.0
    for iteration in then[:-1]:
        world.agents.set_round(FAST, iteration)
        time.sleep(10 * POLL_S)
        assert journal.vm(drain_id, FAST).tuning_applied == ()  # not its round yet
    world.agents.set_round(FAST, then[-1])
    wait_until("FAST switched", lambda: journal.vm(drain_id, FAST).state == "completed")
    world.driver.complete(A)
    assert second.wait(drain_id, WAIT_S)

    assert journal.drain(drain_id).state == "completed"
    _switched_as_planned(journal, drain_id)
    assert not [s for s in journal.steps(drain_id) if str(s.detail.get("action")) == "abort"]
    assert {r.vm_uuid: r.attempts for r in journal.vms(drain_id)} == dict.fromkeys(GUESTS, 1)
    assert [s.instance_uuid for s in world.driver.starts()] == [FAST, A, C, B]
    assert world.calls_since(mark, "MeasureDirtyRate") == []
