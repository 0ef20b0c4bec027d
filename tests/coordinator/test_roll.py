"""Rolls on a simulated cloud: the whole roll end to end, a failing hook (skip, resume),
a host that does not come back, cancel, and a coordinator restarted mid-roll."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostmaint.coordinator import errors
from hostmaint.coordinator.rolljournal import RollHostState, RollState
from hostmaint.protos import coordinator_pb2 as cpb
from tests.coordinator.rollworld import (
    HOSTS,
    WAIT_S,
    RollWorld,
    build,
    planned_moves,
    planned_targets,
    wait_until,
)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[RollWorld]:
    w = build(tmp_path)
    try:
        yield w
    finally:
        w.hold_hooks(False)
        for stopped in w.stops:
            stopped.set()


def request(**kw: object) -> cpb.RollRequest:
    values: dict[str, object] = {"hosts": list(HOSTS), "max_hosts_per_wave": 2, "hook": "patch"}
    values.update(kw)
    return cpb.RollRequest(**values)  # type: ignore[arg-type]


def kinds(events: list[cpb.RollEvent]) -> Counter[str]:
    return Counter(cpb.RollEventKind.Name(e.kind) for e in events)


def test_a_roll_moves_each_vm_as_planned_and_runs_each_hook_once(world: RollWorld) -> None:
    _, rolls = world.coordinator()
    plan, hosts = rolls.plan(request())
    assert hosts == list(HOSTS)
    assert sorted(h.host for w in plan.waves for h in w.hosts) == list(HOSTS)
    assert all(len(w.hosts) <= 2 for w in plan.waves)
    assert plan.predicted_s > 0
    assert plan.predicted_s == pytest.approx(sum(w.predicted_s for w in plan.waves))
    assert world.moves() == Counter()  # planning moves nothing

    roll_id = rolls.start(request())
    events = list(rolls.events(roll_id, lambda: False))
    status = rolls.status(roll_id)
    assert status.state == cpb.ROLL_STATE_COMPLETED, status.message
    assert [h.state for h in status.hosts] == [cpb.ROLL_HOST_STATE_DONE] * 4
    assert all(h.versions_after == "hypervisor 7.2.0, libvirt 9.0.0" for h in status.hosts)
    # every VM moved as the plan said, to the plan's targets in its order
    journaled = status.plan
    assert world.moves() == planned_moves(journaled)
    moved = [(m.instance_uuid, m.source, m.target) for m in world.driver.moves()]
    assert sorted(moved) == sorted(planned_targets(journaled))
    assert world.hook_runs() == Counter(HOSTS)
    assert all(world.driver.host_enabled(h) for h in HOSTS)
    k = kinds(events)
    assert k["ROLL_EVENT_KIND_DRAINED"] == k["ROLL_EVENT_KIND_HOOK_FINISHED"] == 4
    assert k["ROLL_EVENT_KIND_ENABLED"] == 4 and k["ROLL_EVENT_KIND_FINISHED"] == 1
    assert k["ROLL_EVENT_KIND_WAVE_STARTED"] == len(journaled.waves)
    # the hook's output is kept, and its start journaled before its end
    first = status.hosts[0]
    assert first.hook_output.strip() == f"patched {first.host}"
    assert first.hook_started_at.ToNanoseconds() <= first.hook_finished_at.ToNanoseconds()


def test_a_failing_hook_stops_the_roll_then_skip_and_resume(world: RollWorld) -> None:
    _, rolls = world.coordinator()
    plan, _ = rolls.plan(request(max_hosts_per_wave=1))
    order = [w.hosts[0].host for w in plan.waves]
    bad, later = order[1], order[2]
    world.fail_hook_on(bad)
    roll_id = rolls.start(request(max_hosts_per_wave=1))
    events = list(rolls.events(roll_id, lambda: False))
    assert events[-1].kind == cpb.ROLL_EVENT_KIND_STOPPED
    status = rolls.status(roll_id)
    assert status.state == cpb.ROLL_STATE_STOPPED
    failed = {h.host: h for h in status.hosts}[bad]
    assert failed.state == cpb.ROLL_HOST_STATE_FAILED
    assert (failed.step, failed.hook_exit_code) == ("hook", 3)
    assert failed.error == f"the hook exited 3: patch of {bad} failed"
    assert bad in status.message
    assert not world.driver.host_enabled(bad)  # it stays disabled
    assert {h.host: h.state for h in status.hosts}[later] == cpb.ROLL_HOST_STATE_PENDING

    # skipping needs a failed host
    with pytest.raises(errors.PreconditionFailed):
        rolls.resume(roll_id, later, hook_done=False)
    rolls.resume(roll_id, bad, hook_done=False)
    list(rolls.events(roll_id, lambda: False))
    status = rolls.status(roll_id)
    assert status.state == cpb.ROLL_STATE_COMPLETED
    skipped = {h.host: h for h in status.hosts}[bad]
    assert skipped.state == cpb.ROLL_HOST_STATE_SKIPPED
    assert "skipped by the operator" in skipped.error
    assert not world.driver.host_enabled(bad)
    assert world.hook_runs() == Counter(HOSTS)
    # a roll that ended cannot be resumed
    with pytest.raises(errors.PreconditionFailed):
        rolls.resume(roll_id, "", hook_done=False)


def test_resume_runs_the_failed_hook_again(world: RollWorld) -> None:
    _, rolls = world.coordinator()
    world.fail_hook_on("h1", "h2", "h3", "h4")
    roll_id = rolls.start(request(hosts=["h3", "h4"], max_hosts_per_wave=2))
    list(rolls.events(roll_id, lambda: False))
    status = rolls.status(roll_id)
    assert status.state == cpb.ROLL_STATE_STOPPED
    assert sorted(h.host for h in status.hosts if h.state == cpb.ROLL_HOST_STATE_FAILED) == [
        "h3",
        "h4",
    ]
    world.fail_hook_on()
    rolls.resume(roll_id, "", hook_done=False)
    list(rolls.events(roll_id, lambda: False))
    assert rolls.status(roll_id).state == cpb.ROLL_STATE_COMPLETED
    assert world.hook_runs() == Counter({"h3": 2, "h4": 2})  # as the operator asked
    assert world.driver.host_enabled("h3") and world.driver.host_enabled("h4")


def test_a_host_that_does_not_come_back_stops_the_roll(world: RollWorld) -> None:
    _, rolls = world.coordinator(back_timeout_s=0.5)
    world.hold_hooks(True)
    roll_id = rolls.start(request(hosts=["h4"]))
    wait_until("the hook runs", lambda: world.hook_runs())
    world.agents.not_serving.add("h4")  # the host goes away during its hook, and stays
    world.driver.down.add("h4")
    world.hold_hooks(False)
    list(rolls.events(roll_id, lambda: False))
    status = rolls.status(roll_id)
    assert status.state == cpb.ROLL_STATE_STOPPED
    host = status.hosts[0]
    assert (host.state, host.step) == (cpb.ROLL_HOST_STATE_FAILED, "back")
    assert host.error == "not back within 0.5 s: its agent is NOT_SERVING (away)"
    assert not world.driver.host_enabled("h4")
    world.agents.not_serving.clear()
    rolls.resume(roll_id, "", hook_done=False)
    list(rolls.events(roll_id, lambda: False))
    status = rolls.status(roll_id)
    assert status.state == cpb.ROLL_STATE_STOPPED
    assert status.hosts[0].error == "not back within 0.5 s: its compute service is down"
    world.driver.down.clear()
    rolls.resume(roll_id, "", hook_done=False)
    list(rolls.events(roll_id, lambda: False))
    assert rolls.status(roll_id).state == cpb.ROLL_STATE_COMPLETED
    assert world.hook_runs() == Counter({"h4": 1})  # waiting again runs no hook
    assert world.driver.host_enabled("h4")


def test_cancel_lets_the_running_hook_finish_and_starts_nothing_more(world: RollWorld) -> None:
    _, rolls = world.coordinator()
    world.hold_hooks(True)
    roll_id = rolls.start(request(max_hosts_per_wave=1))
    wait_until("the first hook runs", lambda: sum(world.hook_runs().values()) == 1)
    status = rolls.status(roll_id)
    first = next(h.host for h in status.hosts if h.state == cpb.ROLL_HOST_STATE_HOOK_RUNNING)
    rolls.cancel(roll_id, abort_running=False)
    world.hold_hooks(False)
    events = list(rolls.events(roll_id, lambda: False))
    assert events[-1].kind == cpb.ROLL_EVENT_KIND_FINISHED
    status = rolls.status(roll_id)
    assert status.state == cpb.ROLL_STATE_CANCELLED
    states = {h.host: h.state for h in status.hosts}
    assert states[first] == cpb.ROLL_HOST_STATE_WAITING  # its hook done, not re-enabled
    assert [s for h, s in states.items() if h != first] == [cpb.ROLL_HOST_STATE_PENDING] * 3
    assert world.hook_runs() == Counter({first: 1})
    assert not world.driver.host_enabled(first)
    assert all(world.driver.host_enabled(h) for h in HOSTS if h != first)
    with pytest.raises(errors.PreconditionFailed):
        rolls.cancel(roll_id, abort_running=False)


def test_a_restart_during_a_hook_does_not_run_it_again(world: RollWorld) -> None:
    executor, rolls = world.coordinator()
    world.hold_hooks(True)
    roll_id = rolls.start(request(max_hosts_per_wave=1))
    plan = rolls.status(roll_id).plan
    wait_until("the first hook runs", lambda: sum(world.hook_runs().values()) == 1)
    world.stop()  # the coordinator dies with the hook running
    assert rolls.wait(roll_id, WAIT_S)
    world.hold_hooks(False)
    first = next(iter(world.hook_runs()))

    executor, rolls = world.coordinator()
    executor.resume_all()
    assert rolls.resume_all() == [roll_id]
    list(rolls.events(roll_id, lambda: False))
    status = rolls.status(roll_id)
    assert status.state == cpb.ROLL_STATE_STOPPED
    host = {h.host: h for h in status.hosts}[first]
    assert (host.state, host.step) == (cpb.ROLL_HOST_STATE_FAILED, "hook")
    assert "did not finish before the coordinator stopped; it is not run again" in host.error
    assert world.hook_runs() == Counter({first: 1})

    rolls.resume(roll_id, "", hook_done=True)  # the operator checked: the hook did its work
    list(rolls.events(roll_id, lambda: False))
    assert rolls.status(roll_id).state == cpb.ROLL_STATE_COMPLETED
    assert world.hook_runs() == Counter(HOSTS)
    # the hosts still to drain were planned again, onto the same hosts: as many moves
    journaled = rolls.status(roll_id).plan
    assert world.moves() == planned_moves(journaled)
    assert sum(world.moves().values()) == sum(planned_moves(plan).values())


def test_a_restart_mid_drain_resumes_without_moving_a_vm_twice(world: RollWorld) -> None:
    executor, rolls = world.coordinator()
    roll_id = rolls.start(request(max_hosts_per_wave=2))
    plan = rolls.status(roll_id).plan
    wait_until("a drain runs", lambda: world.driver.migrations_started > 0)
    world.stop()
    assert rolls.wait(roll_id, WAIT_S)
    for drain_id in executor.drain_ids():
        assert executor.wait(drain_id, WAIT_S)

    executor, rolls = world.coordinator()
    executor.resume_all()
    rolls.resume_all()
    list(rolls.events(roll_id, lambda: False))
    status = rolls.status(roll_id)
    assert status.state == cpb.ROLL_STATE_COMPLETED, status.message
    assert world.moves() == planned_moves(plan)
    assert world.driver.migrations_started == sum(planned_moves(plan).values())
    assert world.hook_runs() == Counter(HOSTS)


def test_bad_requests_change_nothing(world: RollWorld) -> None:
    _, rolls = world.coordinator()
    for bad, error in [
        (cpb.RollRequest(), errors.InvalidArgument),
        (cpb.RollRequest(hosts=["h1"], aggregate="rack1"), errors.InvalidArgument),
        (cpb.RollRequest(hosts=["h1", "h1"]), errors.InvalidArgument),
        (cpb.RollRequest(hosts=["nope"]), errors.UnknownHost),
        (cpb.RollRequest(aggregate="missing"), errors.InvalidArgument),
        (cpb.RollRequest(aggregate="empty"), errors.InvalidArgument),
        (cpb.RollRequest(hosts=["h1"], hook="../bin/sh"), errors.InvalidArgument),
        (cpb.RollRequest(hosts=["h1"], hook="absent"), errors.PreconditionFailed),
        (cpb.RollRequest(hosts=["h1"], hook="patch 'unclosed"), errors.InvalidArgument),
    ]:
        with pytest.raises(error):
            rolls.start(bad)
    assert rolls.journal.latest_roll() is None
    assert all(world.driver.host_enabled(h) for h in HOSTS)
    plan, hosts = rolls.plan(cpb.RollRequest(aggregate="rack1"))
    assert hosts == list(HOSTS) and len(plan.waves) >= 1


def test_a_second_roll_of_a_rolling_host_is_refused(world: RollWorld) -> None:
    _, rolls = world.coordinator()
    world.hold_hooks(True)
    roll_id = rolls.start(request(hosts=["h3", "h4"]))
    with pytest.raises(errors.DrainConflict):
        rolls.start(request(hosts=["h4", "h1"]))
    assert rolls.open_roll_of(request(hosts=["h4", "h3"])) == roll_id
    assert rolls.open_roll_of(cpb.RollRequest(aggregate="rack1")) is None
    world.hold_hooks(False)
    list(rolls.events(roll_id, lambda: False))
    assert rolls.journal.roll(roll_id).state == RollState.COMPLETED
    assert {h.state for h in rolls.journal.hosts(roll_id)} == {RollHostState.DONE}
