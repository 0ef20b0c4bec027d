"""tools/bench_lab_onebyone.py without a lab: its mixes, the plan it replays, its tables."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from hostmaint.coordinator import cliview
from hostmaint.lab import errors
from hostmaint.lab.guest import GuestMode, GuestPattern
from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import coordinator_pb2 as cpb
from tools import bench_lab_onebyone as bench

SECONDS_PER_BOOT_MIB = 0.14  # what booting a lab guest costs per MiB written, here


def _at(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(round(seconds * 1e9))
    return ts


def _status() -> cpb.DrainStatus:
    """Three VMs: the plan's order a, b, c; the drain started c, then a; b never started."""
    plan = cpb.DrainPlan(
        host="h0",
        predicted_makespan_s=30.0,
        migrations=[
            cpb.PlannedMigration(
                vm_uuid="ua",
                name="a",
                target_host="h1",
                position=0,
                predicted_total_s=10.0,
                tuning=cpb.TUNING_AUTO_CONVERGE,
                qemu_max_downtime_ms=400,
            ),
            cpb.PlannedMigration(
                vm_uuid="ub",
                name="b",
                target_host="h2",
                position=1,
                predicted_total_s=8.0,
                tuning=cpb.TUNING_NONE,
                qemu_max_downtime_ms=300,
            ),
            cpb.PlannedMigration(
                vm_uuid="uc",
                name="c",
                target_host="h2",
                position=2,
                predicted_total_s=20.0,
                tuning=cpb.TUNING_POSTCOPY,
                qemu_max_downtime_ms=450,
                precopy_tries=3,
            ),
        ],
    )
    vms = [
        cpb.VmStatus(
            vm_uuid="ua",
            name="a",
            state=cpb.VM_STATE_COMPLETED,
            target_host="h1",
            actual_total_s=11.0,
            started_at=_at(105.0),
            finished_at=_at(116.0),
            tuning_applied=["raise_downtime"],
        ),
        cpb.VmStatus(vm_uuid="ub", name="b", state=cpb.VM_STATE_FAILED, target_host="h2"),
        cpb.VmStatus(
            vm_uuid="uc",
            name="c",
            state=cpb.VM_STATE_COMPLETED,
            target_host="h2",
            actual_total_s=19.0,
            started_at=_at(100.0),
            finished_at=_at(119.5),
        ),
    ]
    return cpb.DrainStatus(
        plan=plan,
        vms=vms,
        policy=cpb.DrainPolicy(max_downtime_ms=500, allow_postcopy=False),
        summary=cpb.DrainSummary(actual_makespan_s=27.0),
        started_at=_at(92.5),
    )


def test_steps_follow_the_drains_start_order_then_the_plans() -> None:
    steps = bench.steps_from_status(_status())
    assert [s.name for s in steps] == ["c", "a", "b"]
    assert [s.target for s in steps] == ["h2", "h1", "h2"]


def test_steps_carry_the_plans_tuning() -> None:
    c, a, b = bench.steps_from_status(_status())
    assert (a.max_downtime_ms, a.auto_converge, a.allow_postcopy) == (400, True, False)
    assert a.postcopy_at_iteration is None
    assert (b.max_downtime_ms, b.auto_converge, b.allow_postcopy) == (300, False, False)
    # post-copy planned: permitted, switched after the first pass and 3 more rounds
    assert (c.max_downtime_ms, c.auto_converge, c.allow_postcopy) == (450, False, True)
    assert c.postcopy_at_iteration == 5
    options = bench.migrate_options(c)
    assert (options.max_downtime_ms, options.allow_postcopy, options.auto_converge) == (
        450,
        True,
        False,
    )


def test_policy_allowing_postcopy_permits_it_for_every_vm() -> None:
    status = _status()
    status.policy.allow_postcopy = True
    assert all(s.allow_postcopy for s in bench.steps_from_status(status))
    assert [s.postcopy_at_iteration for s in bench.steps_from_status(status)] == [5, None, None]


def test_postcopy_is_not_permitted_where_the_plan_left_it_out() -> None:
    status = _status()
    status.policy.allow_postcopy = True
    status.plan.notes.append(
        "post-copy left out for the 1 VM going to h1: it cannot do it (no userfaultfd)"
    )
    permitted = {s.name: s.allow_postcopy for s in bench.steps_from_status(status)}
    assert permitted == {"c": True, "a": False, "b": True}
    status.plan.notes[:] = ["post-copy left out: the source host cannot do it (no userfaultfd)"]
    permitted = {s.name: s.allow_postcopy for s in bench.steps_from_status(status)}
    assert permitted == {"c": True, "a": False, "b": False}


def test_a_plan_without_a_target_is_refused() -> None:
    status = _status()
    status.plan.migrations[1].target_host = ""
    status.vms[1].target_host = ""
    with pytest.raises(ValueError, match="b: the plan names no target"):
        bench.steps_from_status(status)


def test_controller_switches_at_the_planned_round_once_and_aborts_late() -> None:
    c, a, _ = bench.steps_from_status(_status())
    control = bench.controller_for(c)("uc")
    precopy = apb.MIGRATION_PHASE_PRECOPY
    assert control(1.0, apb.MigrationProgress(phase=precopy, iteration=4)) is None
    tune = control(2.0, apb.MigrationProgress(phase=precopy, iteration=5))
    assert tune is not None and tune.start_postcopy and tune.domain_uuid == "uc"
    assert control(3.0, apb.MigrationProgress(phase=precopy, iteration=6)) is None
    late = bench.alone_timeout_s(c) + 1
    tune = control(late, apb.MigrationProgress(phase=apb.MIGRATION_PHASE_POSTCOPY))
    assert tune is not None and tune.abort
    never = bench.controller_for(a)("ua")
    assert never(1.0, apb.MigrationProgress(phase=precopy, iteration=50)) is None
    assert bench.alone_timeout_s(a) == bench.ALONE_TIMEOUT_MIN_S
    assert bench.alone_timeout_s(c) == max(bench.ALONE_TIMEOUT_MIN_S, 200.0)


def test_measuring_seconds_from_the_plan() -> None:
    note = "measured the dirty rates of 6 VMs in 7.3s"
    plan = cpb.DrainPlan(
        notes=[note, "post-copy left out"],
        dirty_rates=cpb.DirtyRateSource(measured_vms=6, measuring_s=7.3),
    )
    assert bench.measuring_s(plan) == (7.3, note)
    background = (
        "dirty rates of 6 of 6 VMs from the agent's background readings (the oldest 9s old)"
    )
    stored = cpb.DrainPlan(
        notes=[background],
        dirty_rates=cpb.DirtyRateSource(background_vms=6, oldest_background_age_s=9.0),
    )
    assert bench.measuring_s(stored) == (0.0, background)
    assert bench.measuring_s(cpb.DrainPlan(notes=["post-copy left out"])) == (None, "")


def _result() -> bench.MixResult:
    status = _status()
    steps = bench.steps_from_status(status)
    rows = bench.rows_from_status(status, steps)
    for row, alone in zip(rows, (18.0, 9.0, 7.5), strict=True):
        row.alone_s, row.alone_ok, row.alone_downtime_ms = alone, True, 120.0
    rows[2].alone_ok, rows[2].alone_note = False, "aborted"
    return bench.MixResult(
        mix="tiny",
        vms=3,
        predicted_makespan_s=30.0,
        drain_span_s=(cliview.migration_window(status) or (0.0, 0.0))[1],
        drain_total_s=status.summary.actual_makespan_s,
        measuring_s=7.3,
        measuring_note="",
        drain_failures=1,
        drain_max_downtime_ms=410.0,
        alone_makespan_s=39.0,
        alone_failures=1,
        alone_max_downtime_ms=120.0,
        rows=rows,
    )


def test_rows_take_the_drains_figures_per_vm() -> None:
    rows = _result().rows
    assert [(r.name, r.drain_ok, r.drain_s, r.drain_applied) for r in rows] == [
        ("c", True, 19.0, ""),
        ("a", True, 11.0, "raise_downtime"),
        ("b", False, None, ""),
    ]
    assert rows[0].tuning == "postcopy 450ms pc@5"


def test_span_and_ratios() -> None:
    r = _result()
    assert r.drain_span_s == pytest.approx(19.5)
    assert r.ratio == pytest.approx(19.5 / 39.0)
    assert r.ratio_total == pytest.approx(27.0 / 39.0)


def test_verdict_names_the_mixes_slower_than_one_at_a_time() -> None:
    fast = _result()
    slow = dataclasses.replace(_result(), mix="slow", alone_makespan_s=15.0)
    even = dataclasses.replace(_result(), mix="even", alone_makespan_s=fast.drain_span_s)
    assert bench.slower_mixes([fast, even]) == []
    assert bench.verdict([fast, even]) == "the drain was never slower than one at a time"
    assert bench.slower_mixes([fast, slow, even]) == ["slow"]
    assert bench.verdict([fast, slow]) == ("the drain was SLOWER than one at a time: slow (1.30x)")


def test_summary_table_has_one_row_per_mix() -> None:
    lines = bench.render_summary([_result()]).splitlines()
    assert lines[0].split()[:4] == ["mix", "VMs", "pred", "s"]
    cells = lines[-1].split()
    assert cells == [
        "tiny",
        "3",
        "30.0",
        "19.5",
        "27.0",
        "7.3",
        "39.0",
        "0.50",
        "0.69",
        "1",
        "1",
        "410",
        "120",
    ]


def test_vm_table_shows_predicted_drain_and_alone() -> None:
    lines = bench.render_vms(_result()).splitlines()
    assert len(lines) == 1 + 3  # headers, one per VM
    c_line = next(line for line in lines if line.startswith("c "))
    assert "20.0" in c_line and "19.0" in c_line and "18.0" in c_line and "0.95" in c_line
    b_line = next(line for line in lines if line.startswith("b "))
    assert "drain FAILED" in b_line and "alone FAILED (aborted)" in b_line


def test_json_carries_the_ratios_and_rows(tmp_path: Path) -> None:
    out = json.loads(bench.to_json([_result()]))
    assert out[0]["mix"] == "tiny" and out[0]["ratio"] == pytest.approx(0.5)
    assert [r["name"] for r in out[0]["rows"]] == ["c", "a", "b"]


@pytest.mark.parametrize("name", sorted(bench.MIXES))
def test_mixes_are_valid_specs_with_every_guest_on_host_0(name: str) -> None:
    mix = bench.load_mix(name, bench.MIXES[name])
    assert mix.settings.hosts >= 2
    assert mix.policy.max_downtime_ms == mix.settings.max_downtime_ms
    from hostmaint.lab.demo import load_demo

    _, plans = load_demo(mix.path)
    assert {p.host_index for p in plans} == {0}
    boot_mib = sum(p.spec.fill_mib + p.spec.working_set_mib for p in plans)
    assert boot_mib * SECONDS_PER_BOOT_MIB < 120  # a lab that boots in a few minutes


def test_six_mix_is_the_six_guest_case() -> None:
    mix = bench.load_mix("six", bench.MIXES["six"])
    assert len(mix.guests) == 6
    assert mix.policy.max_downtime_ms == 500 and mix.policy.allow_postcopy
    _, plans = bench.load_demo(mix.path)
    specs = [p.spec for p in plans]
    shapes = {(s.memory_mib, s.working_set_mib, s.dirty_rate_mibps) for s in specs}
    assert {(384, 256, 8), (512, 192, 25)} <= shapes
    others = [s for s in specs if (s.memory_mib, s.working_set_mib) not in {(384, 256), (512, 192)}]
    assert all(256 <= s.memory_mib <= 512 and 0 <= s.dirty_rate_mibps <= 16 for s in others)
    assert {GuestPattern.RANDOM, GuestPattern.HOTCOLD, GuestPattern.BURSTY} <= {
        s.pattern for s in others
    }


def test_patterns_mix_has_one_guest_per_pattern() -> None:
    _, plans = bench.load_demo(bench.MIXES["patterns"])
    specs = [p.spec for p in plans]
    assert 4 <= len(specs) <= 5
    assert {s.pattern for s in specs if s.mode is GuestMode.PACED} == set(GuestPattern)
    assert [s.mode for s in specs].count(GuestMode.CPU) == 1
    assert all(256 <= s.memory_mib <= 512 for s in specs)
    assert all(8 <= s.dirty_rate_mibps <= 30 for s in specs)


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ("allow_postcopy = 1", "allow_postcopy must be true or false"),
        ("max_parallel_per_source = -1", "max_parallel_per_source must be a whole number"),
        ("deadline = 3", "unknown keys"),
    ],
)
def test_a_bad_policy_table_is_refused(tmp_path: Path, policy: str, message: str) -> None:
    spec = tmp_path / "mix.toml"
    spec.write_text(
        f"[demo]\nhosts = 2\n\n[policy]\n{policy}\n\n"
        '[[guests]]\nname = "g"\nmemory_mib = 256\nworking_set_mib = 8\n'
        "dirty_rate_mibps = 1\nhost = 0\n"
    )
    with pytest.raises(errors.SpecError, match=message):
        bench.load_mix("bad", spec)
