"""A burst in the executor: the order of its agent calls, and that it always ends.

The agent is a recorder of TuneMigration requests (the lab test
tests/lab/test_link_sharing.py shows the same calls on real migrations); the
running migrations are threads that stay alive until the test ends them.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hostmaint.coordinator import errors, resume
from hostmaint.coordinator.escalation import Escalation
from hostmaint.coordinator.executor import EventBus, Executor, ExecutorSettings, _Run
from hostmaint.coordinator.journal import Journal, VmRow, make_engine
from hostmaint.coordinator.model import DrainPolicy, Settings, Tuning
from hostmaint.coordinator.planner import HELD_BACK_BYTES_PER_S, MAX_BURST_S, PlannedMigration
from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import coordinator_pb2 as cpb
from tests.coordinator.stuckagent import Clock

HELD = round(HELD_BACK_BYTES_PER_S)


@dataclass
class Recorder:
    """An agent client that records each TuneMigration and refuses the VMs in ``refuse``;
    with ``caps`` (each job's bandwidth cap, 0: none) it answers the cap a bandwidth
    change replaced, as the agent does (without: an agent that does not say)."""

    refuse: set[str] = field(default_factory=set)
    calls: list[tuple[str, str, int]] = field(default_factory=list)
    caps: dict[str, int] | None = None

    def tune(self, request: apb.TuneMigrationRequest) -> apb.TuneMigrationResponse:
        if request.domain_uuid in self.refuse:
            raise errors.AgentRefused("h", "TuneMigration", "FAILED_PRECONDITION", "no job")
        answer = apb.TuneMigrationResponse()
        if request.HasField("bandwidth_bytes_per_s"):
            self.calls.append((request.domain_uuid, "bandwidth", request.bandwidth_bytes_per_s))
            if self.caps is not None:
                answer.previous_bandwidth_bytes_per_s = self.caps.get(request.domain_uuid, 0)
                self.caps[request.domain_uuid] = request.bandwidth_bytes_per_s
        if request.HasField("max_downtime_ms"):
            kind = "lower" if request.lower_max_downtime else "raise"
            self.calls.append((request.domain_uuid, kind, request.max_downtime_ms))
        return answer


@dataclass
class Registry:
    agent: Recorder

    def client(self, host: str) -> Recorder:
        return self.agent


@dataclass
class Bench:
    executor: Executor
    agent: Recorder
    run: _Run
    clock: Clock


def _planned(vm: str, cap: float | None) -> PlannedMigration:
    settings = Settings(150.0, max_bandwidth_bytes_per_s=cap, burst_s=2.0)
    return PlannedMigration(vm, vm, None, 0, 0.0, 10.0, 100.0, Tuning.NONE, settings, 0.0)


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    agent, clock = Recorder(), Clock()
    journal = Journal(make_engine(f"sqlite:///{tmp_path / 'j.db'}"), clock=clock)
    settings = ExecutorSettings(defaults=DrainPolicy(), link_bandwidth_bytes_per_s=1.25e9)
    executor = Executor(None, Registry(agent), journal, settings, clock=clock)  # type: ignore[arg-type]
    run = _Run("d", "h", DrainPolicy(), cpb.DrainPolicy(), EventBus())
    run.planned = {"a": _planned("a", None), "b": _planned("b", 50e6), "c": _planned("c", None)}
    stop = threading.Event()
    for vm in ("a", "b", "c"):
        thread = threading.Thread(target=stop.wait, daemon=True)
        run.threads.add(vm, thread)
        thread.start()
    try:
        yield Bench(executor, agent, run, clock)
    finally:
        stop.set()


def test_the_others_are_capped_before_the_holders_limit_is_raised(bench: Bench) -> None:
    ex, run = bench.executor, bench.run
    ex._hold_link(run, "a", 800, 150)
    assert bench.agent.calls == [
        ("b", "bandwidth", HELD),
        ("c", "bandwidth", HELD),
        ("a", "raise", 800),
    ]
    assert ex._held_back(run, "b") and ex._held_back(run, "c") and not ex._held_back(run, "a")
    assert ex._slot(run, VmRow("d", "a", "a", 0, "migrating", "h")).holds_link  # nothing starts
    with pytest.raises(errors.PreconditionFailed):
        ex._hold_link(run, "b", 800, 150)  # one burst at a time
    bench.agent.calls.clear()
    ex._release_link(run, "a", 150)
    # the holder's limit back down first, then each neighbour's planned cap (0: none): this
    # agent does not say what it replaced
    assert bench.agent.calls == [
        ("a", "lower", 150),
        ("b", "bandwidth", 50_000_000),
        ("c", "bandwidth", 0),
    ]
    assert run.burst is None and not ex._held_back(run, "b")


def test_the_others_get_back_the_cap_the_agent_says_they_had(bench: Bench) -> None:
    """b's job runs at 30 MB/s (Nova's live_migration_bandwidth, say), not the plan's
    50 MB/s; c's at 100 MB/s an operator set, where the plan has none: each gets its own
    back."""
    bench.agent.caps = {"b": 30_000_000, "c": 100_000_000}
    ex, run = bench.executor, bench.run
    ex._hold_link(run, "a", 800, 150)
    bench.agent.calls.clear()
    ex._release_link(run, "a", 150)
    assert bench.agent.calls == [
        ("a", "lower", 150),
        ("b", "bandwidth", 30_000_000),
        ("c", "bandwidth", 100_000_000),
    ]
    assert bench.agent.caps == {"b": 30_000_000, "c": 100_000_000}


def test_a_refused_cap_undoes_the_burst_before_the_holders_limit_moves(bench: Bench) -> None:
    bench.agent.refuse.add("c")
    with pytest.raises(errors.AgentRefused):
        bench.executor._hold_link(bench.run, "a", 800, 150)
    assert bench.agent.calls == [("b", "bandwidth", HELD), ("b", "bandwidth", 50_000_000)]
    assert bench.run.burst is None


def test_a_burst_ends_with_its_holder_or_when_it_overruns(bench: Bench) -> None:
    ex, run = bench.executor, bench.run
    ex._hold_link(run, "a", 800, 150)
    ex._end_burst(run, "b")  # not the holder: nothing
    assert run.burst is not None
    ex._end_burst(run, "a")  # the holder's watcher ended (converged, failed, stopping)
    assert run.burst is None
    assert bench.agent.calls[-2:] == [("b", "bandwidth", 50_000_000), ("c", "bandwidth", 0)]

    bench.agent.calls.clear()
    ex._hold_link(run, "a", 800, 150)
    bench.clock.now += MAX_BURST_S + ex.settings.stall_grace_s - 1
    assert ex._held_back(run, "b")
    bench.clock.now += 2  # its watcher lost: a held-back neighbour gives the link back
    assert not ex._held_back(run, "b")
    assert run.burst is None
    assert bench.agent.calls[-3:] == [
        ("a", "lower", 150),
        ("b", "bandwidth", 50_000_000),
        ("c", "bandwidth", 0),
    ]


def test_a_restart_resets_the_burst_the_previous_coordinator_left(bench: Bench) -> None:
    """Adopted after a restart that a burst outlived: each migration gets its planned cap
    back; the one that held the link (its journal: a hold, no release) also the limit it
    had before the burst, lowered, and its ladder stands as after a release."""
    ex, run, clock = bench.executor, bench.run, bench.clock
    hold = resume.TuneStep("hold_link=800", 20.0, True, restore_ms=200)
    holding = resume.ladder_state([hold])
    released = resume.ladder_state([hold, resume.TuneStep("release_link=200", 23.0, True)])
    holder = VmRow("d", "a", "a", 0, "migrating", "h", started_at=clock.now - 30)
    done = VmRow("d", "c", "c", 0, "migrating", "h", started_at=clock.now - 30)
    held = VmRow("d", "b", "b", 0, "migrating", "h", started_at=clock.now - 30)
    after = [
        ex._undo_burst(run, row, state)
        for row, state in ((holder, holding), (done, released), (held, Escalation()))
    ]
    assert bench.agent.calls == [
        ("a", "bandwidth", 0),
        ("a", "lower", 200),
        ("c", "bandwidth", 0),
        ("b", "bandwidth", 50_000_000),
    ]
    assert not after[0].holding and after[0].burst and after[0].after_burst
    assert after[0].level_at_s == 30.0  # released now: the next step follows at once
    assert after[1:] == [released, Escalation()]
    # a hold journaled without the limit it replaced: the plan's limit
    bench.agent.calls.clear()
    ex._undo_burst(run, holder, resume.ladder_state([dataclasses.replace(hold, restore_ms=0)]))
    assert bench.agent.calls == [("a", "bandwidth", 0), ("a", "lower", 150)]
    bench.agent.refuse.add("a")  # it ended meanwhile: a warning, no error
    ex._undo_burst(run, holder, holding)
