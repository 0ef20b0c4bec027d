"""What a restarted coordinator resumes from: the journaled plan and the ladder's state."""

from __future__ import annotations

import dataclasses
import json

import pytest

from hostmaint.coordinator import escalation as esc
from hostmaint.coordinator import resume
from hostmaint.coordinator.model import (
    FULLY_CAPABLE,
    GIB,
    MIB,
    DrainPolicy,
    HostCapabilities,
    Link,
    TargetHost,
    VmSpec,
)
from hostmaint.coordinator.planner import PlannedMigration, plan_drain
from tests.coordinator.test_dispatch_escalation import LIMITS
from tests.unit.test_planner import found_800_mib_set

MB = 1e6


def _plan() -> list[PlannedMigration]:
    vms = [
        dataclasses.replace(found_800_mib_set(), uuid="hot", name="hot"),
        VmSpec("idle", "idle", 2 * GIB, dirty_rate_bytes_per_s=5 * MIB),
    ]
    targets = [TargetHost("t1", 64 * GIB, 64), TargetHost("t2", 64 * GIB, 64)]
    plan = plan_drain(vms, targets, Link(1.25e9), DrainPolicy(allow_postcopy=True))
    return list(plan.migrations)


def test_a_vms_plan_comes_back_from_the_journal_as_planned() -> None:
    planned = _plan()
    assert any(m.settings.postcopy_after_first_round for m in planned)
    no_throttle = HostCapabilities(vcpu_throttle=False, vcpu_throttle_reason="no CPU controller")
    for m in planned:
        for cpu_bound, source in ((False, FULLY_CAPABLE), (True, no_throttle)):
            plan = resume.VmPlan(m, cpu_bound, source)
            assert resume.vm_plan_from_json(resume.vm_plan_json(plan)) == plan


def test_a_journal_of_another_version_is_read_or_refused() -> None:
    m = _plan()[0]
    data = json.loads(resume.vm_plan_json(resume.VmPlan(m, True)))
    data["settings"]["newer_knob"] = 3  # written by a newer coordinator: left out
    data["newer_field"] = "x"
    del data["settings"]["burst_s"]  # written by an older one: its defaults
    del data["cpu_bound"]
    del data["source"]
    back = resume.vm_plan_from_json(json.dumps(data))
    settings = dataclasses.replace(m.settings, burst_s=0.0)
    assert back == resume.VmPlan(dataclasses.replace(m, settings=settings), False, FULLY_CAPABLE)
    for text in ("", "{}", "[]", '{"settings": 1}', json.dumps({**data, "tuning": "warp"})):
        with pytest.raises(ValueError):
            resume.vm_plan_from_json(text)


def _stuck(until_s: float) -> list[esc.Observation]:
    """No progress from 0 s to `until_s`, sampled every 2 s."""
    return [
        esc.Observation(t, 3 + i, 500 * int(MB), 50 * MB, 300)
        for i, t in enumerate(range(0, int(until_s) + 1, 2))
    ]


def test_the_ladder_replayed_from_its_steps_stands_where_it_stood() -> None:
    """The steps the ladder took on a stuck migration, journaled as the executor does:
    replayed, they give the ladder's own state, so the next step after a restart is the
    one it would have taken, when it would have taken it."""
    done, journaled = esc.Escalation(), []
    for now_s in range(30, 61):
        d = esc.next_step(_stuck(now_s), LIMITS, done)
        if d.action is esc.Action.NONE:
            continue
        label = f"{d.action}" + (f"={d.value}" if d.value else "")
        journaled.append(resume.TuneStep(label, float(now_s), True, d.restore_ms))
        done = esc.applied(done, d, float(now_s))
    assert [s.label for s in journaled] == [
        "raise_downtime=800",
        "throttle_vcpus=40",
        "throttle_vcpus=70",
        "throttle_vcpus=90",
    ]
    replayed = resume.ladder_state(journaled)
    assert replayed == done
    # a restart 1 s after the last step: nothing until it settled, then post-copy (not a
    # raise or a throttle again)
    last = journaled[-1].at_s
    assert esc.next_step(_stuck(last + 1), LIMITS, replayed).action is esc.Action.NONE
    later = esc.next_step(_stuck(last + LIMITS.settle_s), LIMITS, replayed)
    assert later.action is esc.Action.POSTCOPY


def test_a_step_whose_outcome_is_unknown_counts_only_where_the_job_cannot_tell() -> None:
    hold = resume.TuneStep("hold_link=800", 10.0, None, restore_ms=150)
    holding = resume.ladder_state([hold])
    assert holding.holding and holding.burst and holding.restore_ms == 150
    # its release interrupted: it may still hold the link
    release = resume.TuneStep("release_link=150", 12.0, None)
    assert resume.ladder_state([dataclasses.replace(hold, ok=True), release]) == holding
    # a post-copy switch or an abort shows on the job: not counted
    raised = resume.TuneStep("raise_downtime=800", 5.0, True)
    for label in ("postcopy", "abort"):
        state = resume.ladder_state([raised, resume.TuneStep(label, 9.0, None)])
        assert state == resume.ladder_state([raised])
        assert not (state.postcopy or state.postcopy_failed or state.aborted)
    # refused, the switch is not asked again: abort is next
    refused = resume.ladder_state([raised, resume.TuneStep("postcopy", 9.0, False)])
    assert refused.postcopy_failed and not refused.postcopy
    # a raise or a throttle counts as taken either way
    unknown = resume.ladder_state(
        [
            resume.TuneStep("raise_downtime=800", 5.0, None),
            resume.TuneStep("throttle_vcpus=40", 9.0, None),
        ]
    )
    assert unknown.downtime_raised and unknown.throttle_pct == 40 and unknown.level_at_s == 9.0
    # what is not a step of the ladder is skipped
    assert resume.ladder_state([resume.TuneStep("warp=9", 1.0, True)]) == esc.Escalation()


def test_a_hold_is_known_done_only_when_its_step_succeeded_and_nothing_released_it() -> None:
    hold = resume.TuneStep("hold_link=800", 10.0, True, restore_ms=150)
    raised = resume.TuneStep("raise_downtime=800", 5.0, True)
    assert resume.hold_done([raised, hold])
    assert not resume.hold_done([raised])
    assert not resume.hold_done([dataclasses.replace(hold, ok=None)])  # killed inside it
    assert not resume.hold_done([dataclasses.replace(hold, ok=False)])
    release = resume.TuneStep("release_link=150", 12.0, True)
    assert not resume.hold_done([hold, release])
    assert not resume.hold_done([hold, dataclasses.replace(release, ok=None)])
    # a later step that is not of the link leaves the hold as it was
    assert resume.hold_done([hold, resume.TuneStep("postcopy", 13.0, None)])
