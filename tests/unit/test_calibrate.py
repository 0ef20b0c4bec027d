"""Calibration against a lab CSV: reading, error statistics, fitting."""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path

import pytest

from hostmaint.coordinator import calibrate
from hostmaint.coordinator.escalation import Observation
from hostmaint.coordinator.model import DEFAULT_PARAMS

COLUMNS = list(calibrate.CSV_COLUMNS)
CASES = [
    (256, 256, 192, 40, "precopy", 400, 1, 300),
    (256, 128, 64, 0, "precopy", 400, 1, 300),
    (512, 400, 128, 60, "auto_converge/cpu", 400, 1, 300),
    (256, 256, 192, 40, "precopy", 400, 2, 300),
    (512, 512, 256, 90, "postcopy", 400, 1, 300),
]


def lab_csv(scale_total: float = 1.0) -> str:
    """A tiny 'lab' CSV whose measurements are what the model itself predicts (x scale)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    truth = dataclasses.replace(DEFAULT_PARAMS, switchover_ms=60.0)
    for case in CASES:
        row = calibrate.LabRow(*case, total_s=0.0, downtime_ms=0.0, iterations=0, converged=True)
        ok, total_s, downtime_ms, rounds = calibrate.predict_row(row, truth)
        w.writerow(
            [*case, total_s * scale_total if ok else "", downtime_ms if ok else "", rounds, ok]
        )
    return buf.getvalue()


def test_read_rows() -> None:
    rows = calibrate.read_rows(io.StringIO(lab_csv()))
    assert len(rows) == len(CASES)
    assert rows[2].mode == "auto_converge/cpu" and rows[3].concurrency == 2
    assert not rows[3].converged  # the lab pair sent at once never converges


def test_errors_against_known_truth_and_fit_recovers() -> None:
    rows = calibrate.read_rows(io.StringIO(lab_csv()))
    rep = calibrate.errors(rows, DEFAULT_PARAMS)
    assert rep.compared == len(CASES) - 1 and rep.convergence_mismatch == 0
    assert rep.downtime_median > 0.0  # default switch-over (25 ms) != the lab's (60 ms)
    fitted = calibrate.fit(rows, DEFAULT_PARAMS, passes=1)
    assert calibrate.errors(rows, fitted).downtime_median < rep.downtime_median


def test_errors_measure_a_known_bias() -> None:
    rows = calibrate.read_rows(io.StringIO(lab_csv(scale_total=1.25)))
    truth = dataclasses.replace(DEFAULT_PARAMS, switchover_ms=60.0)
    rep = calibrate.errors(rows, truth)
    assert rep.total_median == pytest.approx(0.2)  # |x - 1.25x| / 1.25x
    assert rep.downtime_median == pytest.approx(0.0, abs=1e-9)


def test_main_prints_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "lab.csv"
    path.write_text(lab_csv())
    assert calibrate.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "total_s error: median=" in out and "downtime_ms error" in out
    assert "the lab's repeatability" in out


def _row(converged: bool, total_s: float) -> calibrate.LabRow:
    return calibrate.LabRow(
        size_mib=256,
        fill_mib=256,
        working_set_mib=64,
        dirty_rate_mibps=5,
        mode="precopy",
        link_mbit=400,
        concurrency=1,
        downtime_limit_ms=300,
        total_s=total_s,
        downtime_ms=float("nan"),
        iterations=0,
        converged=converged,
    )


def test_a_row_given_up_on_holds_the_model_to_the_same_bound() -> None:
    ok, model_total_s, _, _ = calibrate.predict_row(_row(True, 0.0))
    assert ok
    early = _row(False, model_total_s / 2)  # the lab aborted before the model would finish
    assert not calibrate.predict_row(early)[0]
    assert calibrate.errors([early]).convergence_mismatch == 0
    late = _row(False, model_total_s * 2)  # it waited long enough: a real disagreement
    assert calibrate.errors([late]).convergence_mismatch == 1


def test_fill_sits_beside_the_working_set() -> None:
    row = dataclasses.replace(_row(True, 10.0), size_mib=256, fill_mib=32, working_set_mib=32)
    assert calibrate.row_vm(row, 0).nonzero_bytes == 64 * 2**20
    full = dataclasses.replace(row, fill_mib=250)
    assert calibrate.row_vm(full, 0).nonzero_bytes == 256 * 2**20  # never above the size


def test_repeatability_is_the_spread_of_repeated_runs_around_their_median() -> None:
    """Three runs of one configuration (10, 12, 15 s; 100, 100, 200 ms) and one of another
    (not repeated: left out); a run that did not converge is left out too."""
    base = _row(True, 0.0)
    rows = [
        dataclasses.replace(base, total_s=t, downtime_ms=d)
        for t, d in ((10.0, 100.0), (12.0, 100.0), (15.0, 200.0))
    ]
    rows.append(dataclasses.replace(base, downtime_limit_ms=100, total_s=99.0, downtime_ms=9.0))
    rows.append(dataclasses.replace(base, converged=False, total_s=99.0))
    rep = calibrate.repeatability(rows)
    assert (rep.runs, rep.configurations) == (3, 1)
    assert rep.total_median == pytest.approx(2 / 12)  # deviations 2/12, 0, 3/12
    assert rep.total_p90 == pytest.approx(2.8 / 12)  # between 2/12 and 3/12
    assert rep.downtime_median == pytest.approx(0.0)  # 0, 0, 1


def test_false_convergence_is_counted_apart_from_a_missed_one() -> None:
    _, model_total_s, _, _ = calibrate.predict_row(_row(True, 0.0))
    late = _row(False, model_total_s * 2)  # the model converges, the lab did not
    rep = calibrate.errors([late])
    assert (rep.convergence_mismatch, rep.false_convergence) == (1, 1)
    fast = dataclasses.replace(_row(True, 10.0), dirty_rate_mibps=400.0)  # cannot converge
    assert not calibrate.predict_row(fast)[0]
    rep = calibrate.errors([fast])
    assert (rep.convergence_mismatch, rep.false_convergence) == (1, 0)


def test_readings_replace_the_configured_writer_only_when_asked() -> None:
    mib = 1024 * 1024
    row = dataclasses.replace(
        _row(True, 10.0), pattern="random", measured_rate_mibps=3.0, measured_ws_mib=40.0
    )
    assert calibrate.row_vm(row, 0).dirty_rate_bytes_per_s == 5 * mib
    vm = calibrate.row_vm(row, 0, measured=True)
    assert (vm.dirty_rate_bytes_per_s, vm.working_set_bytes) == (3 * mib, 40 * mib)
    unread = calibrate.row_vm(_row(True, 10.0), 0, measured=True)  # no readings: configured
    assert unread.dirty_rate_bytes_per_s == 5 * mib


def test_pattern_table_groups_by_writer_and_concurrency() -> None:
    _, model_total_s, _, _ = calibrate.predict_row(_row(True, 0.0))
    rows = [
        dataclasses.replace(_row(True, model_total_s), pattern="random"),
        dataclasses.replace(_row(True, model_total_s * 2), pattern="random"),
        dataclasses.replace(_row(True, model_total_s), pattern="hotcold", mode="precopy/cpu"),
    ]
    table = calibrate.pattern_table(calibrate.predictions(rows)).splitlines()
    by_key = {tuple(line.split()[:2]): line.split() for line in table[1:]}
    assert set(by_key) == {
        ("random", "1"),
        ("random", "all"),
        ("cpu", "1"),
        ("cpu", "all"),
        ("all", "all"),
    }
    assert by_key[("random", "1")][2:4] == ["2", "2"]
    assert by_key[("cpu", "all")][4] == "0.0%"
    assert by_key[("all", "all")][2] == "3"
    # the lab's own spread: the two random runs of one configuration land a third of
    # their median from it (t and 2t around 1.5t); the CPU-bound writer ran once
    assert by_key[("random", "1")][-2:] == ["33.3%", "33.3%"]
    assert by_key[("cpu", "1")][-2:] == ["-", "-"]


def test_forecast_errors_are_relative_to_the_time_left() -> None:
    row = _row(True, 20.0)
    good = dataclasses.replace(
        row, forecast_at_s=10.0, forecast_end_s=21.0, forecast_converges=True
    )
    never = dataclasses.replace(
        row, forecast_at_s=10.0, forecast_end_s=float("inf"), forecast_converges=False
    )
    wrong = dataclasses.replace(
        _row(False, 30.0), forecast_at_s=9.0, forecast_end_s=12.0, forecast_converges=True
    )
    rep = calibrate.forecast_errors([good, never, wrong, row])
    assert (rep.rows, rep.compared) == (3, 1)
    assert rep.remaining_median == pytest.approx(0.1)  # 1 s off of 10 s left
    assert (rep.said_never_converged, rep.said_converges_did_not) == (1, 1)


def test_the_forecast_is_set_beside_the_lab_repeating_a_configuration() -> None:
    # one configuration run three times, ending at 20, 24 and 30 s (median 24 s), each
    # forecast 10 s in; a row run once has no repeats to be set beside
    runs = [
        dataclasses.replace(
            _row(True, end_s),
            pattern="random",
            forecast_at_s=10.0,
            forecast_end_s=22.0,
            forecast_converges=True,
        )
        for end_s in (20.0, 24.0, 30.0)
    ]
    once = dataclasses.replace(runs[0], pattern="seq", dirty_rate_mibps=7.0)
    rep = calibrate.forecast_errors([*runs, once])
    assert (rep.compared, rep.lab_rows) == (4, 3)
    # the median end's error on the time left: 4/10, 0/14, 6/20
    assert rep.lab_median == pytest.approx(0.3)
    # the forecast's own: 2/10, 2/14, 8/20 and the row run once 2/10
    assert rep.remaining_median == pytest.approx(0.2)
    table = calibrate.forecast_table([*runs, once]).splitlines()
    by_key = {tuple(line.split()[:2]): line.split() for line in table[1:]}
    assert set(by_key) == {
        ("random", "1"),
        ("random", "all"),
        ("seq", "1"),
        ("seq", "all"),
        ("all", "all"),
    }
    assert by_key[("random", "1")][2:4] == ["3", "3"]
    assert by_key[("random", "1")][-2] == "30.0%"
    assert by_key[("seq", "1")][-2:] == ["-", "-"]  # ran once


def test_a_row_with_samples_is_forecast_again_on_them() -> None:
    mib = 1024 * 1024
    samples = [
        Observation(1.0, 1, 300 * mib, 40.0 * mib, 300, processed_bytes=40 * mib),
        Observation(
            4.0, 2, 64 * mib, 40.0 * mib, 300, first_pass_done=True, processed_bytes=160 * mib
        ),
        Observation(
            5.6, 3, 32 * mib, 40.0 * mib, 300, first_pass_done=True, processed_bytes=224 * mib
        ),
        Observation(
            6.4, 4, 16 * mib, 40.0 * mib, 300, first_pass_done=True, processed_bytes=256 * mib
        ),
    ]
    # recorded as never converging; the samples say otherwise, and they win
    row = dataclasses.replace(
        _row(True, 7.5),
        forecast_at_s=1.0,
        forecast_end_s=float("inf"),
        forecast_converges=False,
        samples=calibrate.format_samples(samples),
    )
    assert calibrate.job_samples(row) == tuple(samples)
    again = calibrate.first_forecast(samples)
    assert again is not None and again.converges
    assert calibrate.row_forecast(row) == again
    rep = calibrate.forecast_errors([row])
    assert (rep.rows, rep.compared, rep.said_never_converged) == (1, 1, 0)
