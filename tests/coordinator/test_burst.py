"""A burst on a drain's link: the order of its agent calls, and that it always ends.

The agent is a recorder of TuneMigration requests (the lab test
tests/lab/test_link_sharing.py shows the same calls on real migrations); the
running migrations are a set the test holds.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import pytest

from hostmaint.coordinator import errors, resume
from hostmaint.coordinator.escalation import Escalation
from hostmaint.coordinator.links import LinkArbiter
from hostmaint.coordinator.model import Settings, Tuning
from hostmaint.coordinator.planner import HELD_BACK_BYTES_PER_S, MAX_BURST_S, PlannedMigration
from hostmaint.protos import agent_pb2 as apb
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
class Bench:
    link: LinkArbiter
    agent: Recorder
    clock: Clock
    running: set[str]


def _planned(vm: str, cap: float | None) -> PlannedMigration:
    settings = Settings(150.0, max_bandwidth_bytes_per_s=cap, burst_s=2.0)
    return PlannedMigration(
        vm_uuid=vm,
        vm_name=vm,
        target=None,
        position=0,
        start_s=0.0,
        predicted_total_s=10.0,
        predicted_downtime_ms=100.0,
        tuning=Tuning.NONE,
        settings=settings,
        need_bytes_per_s=0.0,
    )


PLANNED = {"a": _planned("a", None), "b": _planned("b", 50e6), "c": _planned("c", None)}
GRACE_S = 10.0


@pytest.fixture
def bench() -> Bench:
    agent, clock, running = Recorder(), Clock(), {"a", "b", "c"}

    def planned_cap(vm: str) -> int:
        return round(PLANNED[vm].settings.max_bandwidth_bytes_per_s or 0)

    link = LinkArbiter(
        agent=lambda: agent,
        clock=clock,
        running=lambda: running,
        planned_cap=planned_cap,
        overrun_s=MAX_BURST_S + GRACE_S,
    )
    return Bench(link, agent, clock, running)


def test_the_others_are_capped_before_the_holders_limit_is_raised(bench: Bench) -> None:
    link = bench.link
    link.hold("a", 800, 150)
    assert bench.agent.calls == [
        ("b", "bandwidth", HELD),
        ("c", "bandwidth", HELD),
        ("a", "raise", 800),
    ]
    assert link.held_back("b") and link.held_back("c") and not link.held_back("a")
    assert link.holds("a") and not link.holds("b")  # nothing starts (DrainRun.slot)
    with pytest.raises(errors.PreconditionFailed):
        link.hold("b", 800, 150)  # one burst at a time
    bench.agent.calls.clear()
    link.release("a", 150)
    # the holder's limit back down first, then each neighbour's planned cap (0: none): this
    # agent does not say what it replaced
    assert bench.agent.calls == [
        ("a", "lower", 150),
        ("b", "bandwidth", 50_000_000),
        ("c", "bandwidth", 0),
    ]
    assert link.burst is None and not link.held_back("b")


def test_the_others_get_back_the_cap_the_agent_says_they_had(bench: Bench) -> None:
    """b's job runs at 30 MB/s (Nova's live_migration_bandwidth, say), not the plan's
    50 MB/s; c's at 100 MB/s an operator set, where the plan has none: each gets its own
    back."""
    bench.agent.caps = {"b": 30_000_000, "c": 100_000_000}
    link = bench.link
    link.hold("a", 800, 150)
    bench.agent.calls.clear()
    link.release("a", 150)
    assert bench.agent.calls == [
        ("a", "lower", 150),
        ("b", "bandwidth", 30_000_000),
        ("c", "bandwidth", 100_000_000),
    ]
    assert bench.agent.caps == {"b": 30_000_000, "c": 100_000_000}


def test_a_refused_cap_undoes_the_burst_before_the_holders_limit_moves(bench: Bench) -> None:
    bench.agent.refuse.add("c")
    with pytest.raises(errors.AgentRefused):
        bench.link.hold("a", 800, 150)
    assert bench.agent.calls == [("b", "bandwidth", HELD), ("b", "bandwidth", 50_000_000)]
    assert bench.link.burst is None


def test_a_burst_ends_with_its_holder_or_when_it_overruns(bench: Bench) -> None:
    link = bench.link
    link.hold("a", 800, 150)
    link.end("b")  # not the holder: nothing
    assert link.burst is not None
    link.end("a")  # the holder's watcher ended (converged, failed, stopping)
    assert link.burst is None
    assert bench.agent.calls[-2:] == [("b", "bandwidth", 50_000_000), ("c", "bandwidth", 0)]

    bench.agent.calls.clear()
    link.hold("a", 800, 150)
    bench.clock.now += MAX_BURST_S + GRACE_S - 1
    assert link.held_back("b")
    bench.clock.now += 2  # its watcher lost: a held-back neighbour gives the link back
    assert not link.held_back("b")
    assert link.burst is None
    assert bench.agent.calls[-3:] == [
        ("a", "lower", 150),
        ("b", "bandwidth", 50_000_000),
        ("c", "bandwidth", 0),
    ]


def test_a_restart_resets_the_burst_the_previous_coordinator_left(bench: Bench) -> None:
    """Adopted after a restart that a burst outlived: each migration gets its planned cap
    back; the one that held the link (its journal: a hold, no release) also the limit it
    had before the burst, lowered, and its ladder stands as after a release."""
    link = bench.link
    hold = resume.TuneStep("hold_link=800", 20.0, True, restore_ms=200)
    holding = resume.ladder_state([hold])
    released = resume.ladder_state([hold, resume.TuneStep("release_link=200", 23.0, True)])

    def reset(vm: str, state: Escalation) -> Escalation:
        limit_ms = round(PLANNED[vm].settings.downtime_limit_ms)
        return link.reset_after_restart(vm, state, elapsed_s=30.0, planned_limit_ms=limit_ms)

    after = [
        reset(vm, state) for vm, state in (("a", holding), ("c", released), ("b", Escalation()))
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
    reset("a", resume.ladder_state([dataclasses.replace(hold, restore_ms=0)]))
    assert bench.agent.calls == [("a", "bandwidth", 0), ("a", "lower", 150)]
    bench.agent.refuse.add("a")  # it ended meanwhile: a warning, no error
    reset("a", holding)


def test_a_burst_taken_over_after_a_restart_is_released_as_any(bench: Bench) -> None:
    """A burst the previous coordinator left in force is taken over as it stands: nothing
    is tuned then; it holds the others back, overruns from its own start, and its release
    gives the holder its limit back and each neighbour still running its planned cap."""
    link = bench.link
    bench.clock.now = 100.0
    link.resume("a", started=98.0, restore_ms=150, held=["a", "b"])
    assert bench.agent.calls == []
    assert link.holds("a") and link.held_back("b") and not link.held_back("a")
    with pytest.raises(errors.PreconditionFailed):
        link.resume("b", started=99.0, restore_ms=150, held=["a"])
    bench.clock.now = 98.0 + MAX_BURST_S + GRACE_S + 1  # overrun, counted from its start
    assert not link.held_back("b")
    assert bench.agent.calls == [("a", "lower", 150), ("b", "bandwidth", 50_000_000)]
    assert link.burst is None


def test_a_neighbour_that_moved_during_the_burst_is_no_warning_at_its_end(
    bench: Bench, caplog: pytest.LogCaptureFixture
) -> None:
    """A held-back neighbour whose migration ended during the burst (the agent: no job, or
    the domain left) has nothing to give back: the others get theirs, and nothing warns."""
    caplog.set_level(logging.INFO)
    bench.link.hold("a", 800, 150)
    bench.agent.refuse.add("b")  # b's migration completed while held back
    bench.link.release("a", 150)
    assert bench.agent.calls[-2:] == [("a", "lower", 150), ("c", "bandwidth", 0)]
    assert "migration ended during a burst vm=b" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert bench.link.burst is None
