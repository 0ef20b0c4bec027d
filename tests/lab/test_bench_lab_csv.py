"""The lab ground-truth bench's plan and rows (no lab needed): what calibrate reads back."""

from __future__ import annotations

import csv
import io

import pytest

from hostmaint.coordinator import calibrate
from hostmaint.coordinator.model import WriterKind
from tools import bench_lab_csv as bench


def _result(converged: bool, total_s: float = 12.5) -> bench.Result:
    return bench.Result(
        guest="hm-lc-c8",
        source="h0",
        target="h1",
        phase="completed" if converged else "cancelled",
        converged=converged,
        total_s=total_s,
        wall_s=total_s + 1.0,
        downtime_ms=320.0 if converged else None,
        iterations=7,
        rate_before_mibps=3.5,
        rate_during_mibps=2.5,
        max_throttle_pct=30,
        sent_mib=140.0,
        error="",
    )


def _csv(rows: list[dict[str, str]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(bench.COLUMNS))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def test_columns_start_with_what_calibrate_reads() -> None:
    assert bench.COLUMNS[: len(bench.CALIBRATE_COLUMNS)] == bench.CALIBRATE_COLUMNS
    optional = set(calibrate.CSV_OPTIONAL_COLUMNS)
    assert set(calibrate.LabRow.__dataclass_fields__) == set(bench.CALIBRATE_COLUMNS) | optional
    assert optional <= set(bench.EXTRA_COLUMNS)  # the bench writes what calibrate can use
    assert bench.EXTRA_COLUMNS[:3] == ("load_1m", "accel", "started_at")


def test_plan_is_valid_and_groups_are_identical() -> None:
    bench.check_steps(bench.GUESTS, bench.STEPS)
    quick = [g for g in bench.GUESTS if g.name in bench.QUICK_GUESTS]
    bench.check_steps(quick, bench.QUICK_STEPS)
    by_name = {g.name: g for g in bench.GUESTS}
    groups = [s for s in bench.STEPS if len(s.guests) > 1]
    assert {len(s.guests) for s in groups} == {2, 3}
    for step in groups:
        shapes = {
            (g.memory_mib, g.fill_mib, g.working_set_mib, g.dirty_rate_mibps, g.mode)
            for g in (by_name[n] for n in step.guests)
        }
        assert len(shapes) == 1, step
    sizes = {g.memory_mib for g in bench.GUESTS}
    assert min(sizes) == 256 and max(sizes) == 1024
    assert {g.mode for g in bench.GUESTS} == {bench.PACED, bench.CPU}
    assert min(g.dirty_rate_mibps for g in bench.GUESTS) == 0
    link_mibps = 400e6 / 8 / 2**20
    assert max(g.dirty_rate_mibps for g in bench.GUESTS) > link_mibps


def test_every_guest_starts_on_one_host() -> None:
    assert {p.host_index for p in bench.plans(bench.GUESTS)} == {0}


def test_unknown_or_repeated_guest_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown"):
        bench.check_steps(bench.GUESTS, [bench.Step(("hm-lc-nope",))])
    with pytest.raises(ValueError, match="twice"):
        bench.check_steps(bench.GUESTS, [bench.Step(("hm-lc-a1", "hm-lc-a1"))])


@pytest.mark.parametrize("converged", [True, False])
def test_rows_read_back_by_calibrate(converged: bool) -> None:
    spec = next(g for g in bench.GUESTS if g.name == "hm-lc-c8")
    step = bench.Step((spec.name,), bench.Tuning.AUTO_CONVERGE, 1000, 45.0)
    row = bench.row_of(
        spec,
        step,
        _result(converged),
        link_mbit=400,
        load_1m=3.21,
        accel="kvm",
        started_at="2026-01-01T00:00:00+00:00",
    )
    assert list(row) == list(bench.COLUMNS)
    (back,) = calibrate.read_rows(io.StringIO(_csv([row])))
    assert back.mode == "auto_converge/cpu"
    assert calibrate.row_vm(back, 0).writer is WriterKind.CPU
    assert calibrate.row_settings(back).auto_converge
    assert (back.size_mib, back.fill_mib, back.working_set_mib) == (
        spec.memory_mib,
        spec.fill_mib,
        spec.working_set_mib,
    )
    assert back.dirty_rate_mibps == spec.dirty_rate_mibps
    assert (back.concurrency, back.downtime_limit_ms, back.iterations) == (1, 1000, 7)
    assert back.converged is converged
    assert back.total_s == 12.5  # an aborted row keeps how long it ran
    assert (back.downtime_ms == 320.0) if converged else (back.downtime_ms != back.downtime_ms)


def test_mean_rate_of_progress_lines() -> None:
    from hostmaint.lab.guest import GuestMode, GuestProgress

    lines = [
        GuestProgress(float(t), 0, 0.0, r, 1.0, 64, GuestMode.PACED) for t, r in ((1, 8), (2, 12))
    ]
    assert bench.mean_rate(lines) == 10.0
    assert bench.mean_rate([]) is None


def test_outcome_from_where_the_guest_runs() -> None:
    assert bench.outcome_of_placement("h0", "h1", ["h1"]) is True
    assert bench.outcome_of_placement("h0", "h1", ["h0"]) is False
    assert bench.outcome_of_placement("h0", "h1", []) is None  # paused at the switch-over
    assert bench.outcome_of_placement("h0", "h1", ["h0", "h1"]) is None


def test_pattern_set_runs_each_writer_alone_two_and_three_at_once() -> None:
    bench.check_steps(bench.PATTERN_GUESTS, bench.PATTERN_STEPS)
    by_name = {g.name: g for g in bench.PATTERN_GUESTS}
    seen: dict[tuple[str, str], set[int]] = {}
    for step in bench.PATTERN_STEPS:
        specs = [by_name[n] for n in step.guests]
        assert len({(*bench._shape(s), s.pattern) for s in specs}) == 1, step
        key = (specs[0].pattern.value, specs[0].mode.value)
        seen.setdefault(key, set()).add(len(specs))
    assert {p for p, _ in seen} == {"seq", "random", "hotcold", "bursty"}
    assert ("seq", "cpu") in seen
    assert all(counts == {1, 2, 3} for counts in seen.values())
    assert {p.host_index for p in bench.plans(bench.PATTERN_GUESTS)} == {0}


MIB = 1024 * 1024


def _job_log() -> bench.ForecastLog:
    """A job's samples: the first pass, then rounds that halve at 40 MiB/s."""
    from hostmaint.protos import agent_pb2 as pb

    bw = 40 * MIB
    log = bench.ForecastLog()

    def sample(t: float, it: int, remaining: int, processed: int) -> pb.MigrationProgress:
        return pb.MigrationProgress(
            elapsed_ms=int(t * 1000),
            iteration=it,
            memory_total_bytes=400 * MIB,
            memory_remaining_bytes=remaining,
            memory_processed_bytes=processed,
            bandwidth_bytes_per_s=bw,
            max_downtime_ms=300,
        )

    log.add(sample(1.0, 1, 300 * MIB, 40 * MIB))
    sent = 160 * MIB
    t = 4.0
    for it, left in ((2, 64), (3, 32), (4, 16), (5, 8)):
        log.add(sample(t, it, left * MIB, sent))
        sent += left * MIB
        t += left / 40
    return log


def test_a_row_carries_the_pattern_the_readings_and_the_job() -> None:
    from hostmaint.common.dirty import Reading

    spec = next(g for g in bench.PATTERN_GUESTS if g.name == "hm-lc-rnd1")
    step = bench.Step((spec.name,))
    readings = [Reading(14 * MIB, 1), Reading(12 * MIB, 2), Reading(9 * MIB, 4)]
    measured = bench.Measured.of(readings, 7.25)
    log = _job_log()
    result = bench.Result(**{**_result(True, total_s=20.0).__dict__, "forecast": log})
    row = bench.row_of(
        spec,
        step,
        result,
        link_mbit=400,
        load_1m=1.0,
        accel="kvm",
        started_at="t",
        measured=measured,
    )
    assert row["pattern"] == "random"
    assert row["readings"] == "1:14.00 2:12.00 4:9.00"
    assert row["measured_rate_mibps"] == "14.00" and row["measure_s"] == "7.2"
    (back,) = calibrate.read_rows(io.StringIO(_csv([row])))
    assert back.label == "random" and back.measured
    vm = calibrate.row_vm(back, 0, measured=True)
    assert vm.dirty_rate_bytes_per_s == 14 * MIB
    assert calibrate.row_vm(back, 0).dirty_rate_bytes_per_s == 16 * MIB  # the configured
    # the job's samples come back as they were taken, and give the same first forecast
    assert calibrate.job_samples(back) == tuple(log.history)
    first = calibrate.row_forecast(back)
    assert first is not None and first.converges
    assert (back.forecast_at_s, back.forecast_converges) == (first.at_s, True)
    assert back.forecast_end_s == pytest.approx(first.end_s, abs=1e-3)


def test_the_first_forecast_comes_after_the_first_pass() -> None:
    log = _job_log()
    first = calibrate.first_forecast(log.history)
    assert first is not None and first.converges and first.end_s > first.at_s
    assert first.at_s > log.history[0].elapsed_s  # not on the first pass's sample
    assert calibrate.first_forecast(log.history[:1]) is None


def test_only_some_groups_keeps_their_guests_and_steps() -> None:
    guests, steps = bench.only_groups(bench.PATTERN_GUESTS, bench.PATTERN_STEPS, ["hm-lc-rnd"])
    assert [g.name for g in guests] == ["hm-lc-rnd1", "hm-lc-rnd2", "hm-lc-rnd3"]
    assert len(steps) == 4 and all(bench.group_of(s.guests[0]) == "hm-lc-rnd" for s in steps)
    with pytest.raises(ValueError, match="no guests"):
        bench.only_groups(bench.PATTERN_GUESTS, bench.PATTERN_STEPS, ["hm-lc-nope"])
