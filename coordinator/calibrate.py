"""Calibration of the model against the lab's measured migrations.

Run: ``python -m hostmaint.coordinator.calibrate lab.csv [--fit]``.

The CSV has the columns ``size_mib, fill_mib, working_set_mib, dirty_rate_mibps, mode,
link_mbit, concurrency, downtime_limit_ms, total_s, downtime_ms, iterations, converged``.
``fill_mib`` is static non-zero data beside the working set (the lab guest's ``fill=``), so
a row's non-zero memory is ``fill_mib + working_set_mib`` (at most ``size_mib``).
``mode`` names the tuning the row ran with (``precopy``/``none``, ``auto_converge``,
``postcopy``), optionally suffixed ``/cpu`` or ``/paced`` for the writer kind (paced when
absent). A row runs ``concurrency`` identical migrations at once through the simulator
and compares the first one's total time and real downtime with the measured ones. A row
with ``converged`` false gives in ``total_s`` how long the lab let it run before aborting:
the model is held to the same bound (converging later is still "not converged").

Public API: ``LabRow``, ``read_rows(lines)``, ``predict_row(row, params)``,
``errors(rows, params) -> ErrorReport`` (median and 90th percentile of the relative error
of total time and downtime over the rows that converged in the lab and in the model,
and the count of rows where convergence disagrees), ``fit(rows, params)`` (coordinate
search over the calibratable overheads), ``repeatability(rows) -> Repeatability`` (the
median deviation of the lab's repeated runs of one configuration from their own median:
the noise floor of any model's error). ``main`` prints the report.

The lab guests write their working sets in address order, so the rows are predicted
with ``LAB_PARAMS`` (the model with the sequential writer's measured behind-the-cursor
share); the report also shows the planner's default, which assumes a uniform writer and
so over-predicts these guests' re-sent bytes.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from hostmaint.common.dirty import Reading, writer_of
from hostmaint.coordinator.baselines import QueueStrategy
from hostmaint.coordinator.convergence import Migration
from hostmaint.coordinator.escalation import Observation
from hostmaint.coordinator.forecast import forecast
from hostmaint.coordinator.model import (
    DEFAULT_PARAMS,
    MIB,
    SEQUENTIAL_WRITER_BEHIND_FACTOR,
    Link,
    ModelParams,
    Outcome,
    Settings,
    VmSpec,
    WriterKind,
)
from hostmaint.coordinator.simulator import Job, simulate

_T = TypeVar("_T")

LAB_PARAMS = dataclasses.replace(
    DEFAULT_PARAMS, behind_write_factor=SEQUENTIAL_WRITER_BEHIND_FACTOR
)

GOAL_MEDIAN_ERROR = 0.15
# The columns a ground-truth CSV must have (tools/bench_lab_csv.py writes them first).
CSV_COLUMNS = (
    "size_mib",
    "fill_mib",
    "working_set_mib",
    "dirty_rate_mibps",
    "mode",
    "link_mbit",
    "concurrency",
    "downtime_limit_ms",
    "total_s",
    "downtime_ms",
    "iterations",
    "converged",
)
# Read when present: a concurrent step's rows share `started_at`; `wall_s` is request to end;
# `pattern` is the guest's write pattern; `measured_*` what the source agent read of the
# guest before the step, as the planner reads it (common/dirty.py's writer); `forecast_*`
# the running job's first forecast (forecast.py): the job time it was made at and the job
# time it forecast the end at ("inf": it said the job would not converge); `samples` the
# job's progress samples up to its end or post-copy switch (``SAMPLE_FIELDS`` apart by
# commas, samples apart by spaces), on which the forecast is made again as it is now.
CSV_OPTIONAL_COLUMNS = (
    "started_at",
    "wall_s",
    "pattern",
    "measured_rate_mibps",
    "measured_ws_mib",
    "measured_floor_mibps",
    "readings",
    "forecast_at_s",
    "forecast_end_s",
    "forecast_converges",
    "samples",
)
SAMPLE_FIELDS = (
    "elapsed_s",
    "iteration",
    "remaining_bytes",
    "processed_bytes",
    "bandwidth",
    "limit_ms",
)
FIT_FIELDS = (
    "switchover_ms",
    "device_state_bytes",
    "link_efficiency",
    "setup_s",
    "finish_s",
    "iteration_s",
    "zero_scan_bytes_per_s",
    "behind_write_factor",
)


@dataclass(frozen=True)
class LabRow:
    size_mib: float
    fill_mib: float
    working_set_mib: float
    dirty_rate_mibps: float
    mode: str
    link_mbit: float
    concurrency: int
    downtime_limit_ms: float
    total_s: float
    downtime_ms: float
    iterations: int
    converged: bool
    started_at: str = ""  # optional column: rows of one group of migrations share it
    wall_s: float = math.nan  # optional column: request to observed end, wall clock
    pattern: str = ""
    measured_rate_mibps: float = math.nan
    measured_ws_mib: float = math.nan
    measured_floor_mibps: float = math.nan
    # the agent's readings, "window_s:MiB/s" apart by spaces, shortest window first
    readings: str = ""
    forecast_at_s: float = math.nan
    forecast_end_s: float = math.nan
    forecast_converges: bool | None = None
    samples: str = ""

    @property
    def measured(self) -> bool:
        return math.isfinite(self.measured_rate_mibps)

    @property
    def label(self) -> str:
        """The row's writer as the report groups it: the pattern, ``cpu`` for a CPU-bound one."""
        if self.mode.endswith("/cpu"):
            return "cpu"
        return self.pattern or "seq"


def read_rows(lines: Iterable[str]) -> list[LabRow]:
    rows = []
    for rec in csv.DictReader(lines):
        rows.append(
            LabRow(
                size_mib=float(rec["size_mib"]),
                fill_mib=float(rec["fill_mib"]),
                working_set_mib=float(rec["working_set_mib"]),
                dirty_rate_mibps=float(rec["dirty_rate_mibps"]),
                mode=rec["mode"].strip().lower(),
                link_mbit=float(rec["link_mbit"]),
                concurrency=max(1, int(float(rec["concurrency"]))),
                downtime_limit_ms=float(rec["downtime_limit_ms"]),
                total_s=float(rec["total_s"] or "nan"),
                downtime_ms=float(rec["downtime_ms"] or "nan"),
                iterations=int(float(rec["iterations"] or 0)),
                converged=bool(_flag(rec["converged"])),
                started_at=(rec.get("started_at") or "").strip(),
                wall_s=float(rec.get("wall_s") or "nan"),
                pattern=(rec.get("pattern") or "").strip().lower(),
                measured_rate_mibps=float(rec.get("measured_rate_mibps") or "nan"),
                measured_ws_mib=float(rec.get("measured_ws_mib") or "nan"),
                measured_floor_mibps=float(rec.get("measured_floor_mibps") or "nan"),
                readings=(rec.get("readings") or "").strip(),
                forecast_at_s=float(rec.get("forecast_at_s") or "nan"),
                forecast_end_s=float(rec.get("forecast_end_s") or "nan"),
                forecast_converges=_flag(rec.get("forecast_converges")),
                samples=(rec.get("samples") or "").strip(),
            )
        )
    return rows


def _flag(text: str | None) -> bool | None:
    if text is None or not text.strip():
        return None
    return text.strip().lower() in ("1", "true", "yes", "y")


def row_vm(row: LabRow, i: int, measured: bool = False) -> VmSpec:
    """The `i`-th VM of a lab row as the model sees it: from the guest's configuration, or
    (``measured``, where the row has them) from the agent's readings, as the planner sees it."""
    writer = WriterKind.CPU if row.mode.endswith("/cpu") else WriterKind.PACED
    vm = VmSpec(
        uuid=f"lab-{i}",
        name=f"lab-{i}",
        memory_bytes=int(row.size_mib * MIB),
        nonzero_bytes=int(min(row.size_mib, row.fill_mib + row.working_set_mib) * MIB),
        dirty_rate_bytes_per_s=row.dirty_rate_mibps * MIB,
        working_set_bytes=int(max(1.0, row.working_set_mib) * MIB),
        writer=writer,
    )
    if not (measured and row.measured):
        return vm
    points = dirtied_points(row.readings)
    if points:  # read again as the planner reads them now
        w = writer_of([Reading(b / t, t) for t, b in points])
        rate, ws, floor = w.rate_bytes_per_s, w.working_set_bytes, w.rate_floor_bytes_per_s
    else:
        rate = row.measured_rate_mibps * MIB
        ws = int(row.measured_ws_mib * MIB) if math.isfinite(row.measured_ws_mib) else None
        floor = row.measured_floor_mibps * MIB if math.isfinite(row.measured_floor_mibps) else None
    return dataclasses.replace(
        vm,
        dirty_rate_bytes_per_s=rate,
        working_set_bytes=ws,
        dirty_rate_floor_bytes_per_s=floor,
    )


def dirtied_points(readings: str) -> tuple[tuple[float, float], ...]:
    """``"1:14.00 2:12.50"`` (window s: MiB/s) as (window s, unique bytes dirtied) points."""
    points = []
    for part in readings.split():
        window, _, rate = part.partition(":")
        points.append((float(window), float(window) * float(rate) * MIB))
    return tuple(points)


def row_settings(row: LabRow) -> Settings:
    """How the lab row's migrations were started, as the model's settings."""
    mode = row.mode.split("/")[0]
    if mode in ("postcopy", "post-copy"):
        return Settings(
            row.downtime_limit_ms, postcopy_permitted=True, postcopy_after_first_round=True
        )
    if mode in ("auto_converge", "auto-converge", "autoconverge"):
        return Settings(row.downtime_limit_ms, auto_converge=True)
    return Settings(row.downtime_limit_ms)


class _Give(QueueStrategy):
    """Start each VM at its offset (all at 0 by default); abort what runs past the horizon."""

    def __init__(
        self,
        vms: Sequence[VmSpec],
        settings: Settings,
        horizon_s: float,
        offsets_s: Sequence[float] | None = None,
    ) -> None:
        super().__init__("lab", vms, max_parallel=len(vms))
        self.settings = settings
        self.horizon_s = horizon_s
        self.offsets = dict(zip((v.uuid for v in vms), offsets_s or [0.0] * len(vms), strict=True))

    def settings_for(self, vm: VmSpec) -> Settings:
        return self.settings

    def next_jobs(self, now_s: float, running: Sequence[Migration]) -> list[Job]:
        due = [v for v in self.queue if self.offsets[v.uuid] <= now_s + 1e-9]
        self.queue = [v for v in self.queue if v not in due]
        return [Job(v, self.settings) for v in due]

    def next_start_s(self) -> float:
        return min((self.offsets[v.uuid] for v in self.queue), default=math.inf)

    def next_control_s(self, mig: Migration) -> float:
        # past the switch-over the lab no longer aborts: the migration is completing
        return mig.start_s + self.horizon_s if mig.in_precopy else math.inf

    def control(self, mig: Migration, now_s: float) -> None:
        mig.abort()


def _horizon_s(row: LabRow) -> float:
    """How long the simulated migration may run: a row the lab gave up on (not converged,
    with the time it ran) is judged by the same bound; converged rows get ample time."""
    if not math.isfinite(row.total_s) or row.total_s <= 0.0:
        return 600.0
    if not row.converged:
        return row.total_s
    return max(60.0, 3.0 * row.total_s)


def predict_row(
    row: LabRow, params: ModelParams = DEFAULT_PARAMS, offsets_s: Sequence[float] | None = None
) -> tuple[bool, float, float, int]:
    """(converged, total_s, downtime_ms, rounds) of the first of the row's migrations.

    With ``offsets_s`` (one per migration of the row's group), migration ``i`` starts
    ``offsets_s[i]`` seconds after the first, and the result is the one of migration ``index``
    where ``offsets_s[index] == 0`` is not required: see ``predict_group``.
    """
    return predict_group(row, params, offsets_s)[0]


def predict_group(
    row: LabRow,
    params: ModelParams = DEFAULT_PARAMS,
    offsets_s: Sequence[float] | None = None,
    members: Sequence[LabRow] | None = None,
    measured: bool = False,
) -> list[tuple[bool, float, float, int]]:
    """The row's ``concurrency`` identical migrations, started at ``offsets_s`` (default all
    at once): (converged, total_s, downtime_ms, rounds) of each, in order. ``members`` are
    the group's own rows (each VM described by its own; ``measured``: by its readings)."""
    n = row.concurrency if offsets_s is None else len(offsets_s)
    rows = [row] * n if members is None else list(members)
    if len(rows) != n:
        raise ValueError(f"{len(rows)} rows for a group of {n} migrations")
    vms = [row_vm(r, i, measured) for i, r in enumerate(rows)]
    horizon = _horizon_s(row)
    link = Link(row.link_mbit * 1e6 / 8)
    res = simulate(vms, _Give(vms, row_settings(row), horizon, offsets_s), link, params, seed=1)
    by_uuid = {r.uuid: r for r in res.vms}
    out = []
    for vm in vms:
        r = by_uuid.get(vm.uuid)
        if r is None:  # the simulator ran out of events before it ended: it did not converge
            out.append((False, horizon, math.nan, 0))
            continue
        ok = r.outcome is Outcome.COMPLETED
        out.append((ok, r.end_s - r.start_s, r.downtime_ms, r.rounds))
    return out


def group_offsets(rows: Sequence[LabRow]) -> list[float] | None:
    """Start offsets of a group's migrations, from the lab's own columns.

    The lab starts a group's migrations one request after another, so they do not start
    together: a migration's job began about ``wall_s - total_s`` (request to observed end,
    less the job's own time) after its request. None when the columns are missing.
    """
    lags = [r.wall_s - r.total_s for r in rows]
    if len(rows) < 2 or not all(math.isfinite(x) for x in lags):
        return None
    first = min(lags)
    return [lag - first for lag in lags]


def _setup(row: LabRow) -> LabRow:
    """The row's configuration: what the model reads, without what the lab measured or when."""
    return dataclasses.replace(
        row,
        total_s=0,
        downtime_ms=0,
        iterations=0,
        converged=True,
        started_at="",
        wall_s=0.0,  # NaN when absent, and NaN != NaN
        measured_rate_mibps=0.0,
        measured_ws_mib=0.0,
        measured_floor_mibps=0.0,
        readings="",
        forecast_at_s=0.0,
        forecast_end_s=0.0,
        forecast_converges=None,
        samples="",
    )


def _groups(rows: Sequence[LabRow]) -> list[list[LabRow]]:
    """Consecutive rows of one concurrent step (same ``started_at`` and set-up)."""
    out: list[list[LabRow]] = []
    for row in rows:
        prev = out[-1][-1] if out else None
        same = (
            prev is not None
            and row.concurrency > 1
            and row.started_at
            and row.started_at == prev.started_at
            and _setup(row) == _setup(prev)
            and len(out[-1]) < row.concurrency
        )
        if same:
            out[-1].append(row)
        else:
            out.append([row])
    return out


@dataclass(frozen=True)
class ErrorReport:
    rows: int
    compared: int
    convergence_mismatch: int  # both ways
    total_median: float
    total_p90: float
    downtime_median: float
    downtime_p90: float
    false_convergence: int = 0  # predicted to converge, did not in the lab


def _pct(xs: Sequence[float], q: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


Predicted = tuple[LabRow, tuple[bool, float, float, int]]


def predictions(
    rows: Sequence[LabRow], params: ModelParams = DEFAULT_PARAMS, measured: bool = False
) -> list[Predicted]:
    """Each row with the model's (converged, total_s, downtime_ms, rounds) for it, a group
    of concurrent rows simulated together."""
    out: list[Predicted] = []
    for group in _groups(rows):
        offsets = group_offsets(group) if len(group) == group[0].concurrency else None
        if offsets is None:
            out.extend((row, predict_group(row, params, measured=measured)[0]) for row in group)
        else:
            found = predict_group(group[0], params, offsets, group, measured)
            out.extend(zip(group, found, strict=True))
    return out


def errors(
    rows: Sequence[LabRow], params: ModelParams = DEFAULT_PARAMS, measured: bool = False
) -> ErrorReport:
    return error_report(predictions(rows, params, measured))


def error_report(predicted: Sequence[Predicted]) -> ErrorReport:
    tot: list[float] = []
    down: list[float] = []
    mismatch = false_convergence = 0
    for row, (ok, total_s, downtime_ms, _) in predicted:
        if ok != row.converged:
            mismatch += 1
            false_convergence += ok
            continue
        if not ok:
            continue
        if row.total_s > 0:
            tot.append(abs(total_s - row.total_s) / row.total_s)
        if row.downtime_ms > 0:
            down.append(abs(downtime_ms - row.downtime_ms) / row.downtime_ms)
    return ErrorReport(
        rows=len(predicted),
        compared=len(tot),
        convergence_mismatch=mismatch,
        total_median=_pct(tot, 0.5),
        total_p90=_pct(tot, 0.9),
        downtime_median=_pct(down, 0.5),
        downtime_p90=_pct(down, 0.9),
        false_convergence=false_convergence,
    )


@dataclass(frozen=True)
class ForecastReport:
    """The running job's first forecast (made after its first pass) against its real end."""

    rows: int  # rows with a forecast
    compared: int  # converged in the lab and forecast to
    remaining_median: float  # relative error of the remaining time forecast
    remaining_p90: float
    said_never_converged: int  # forecast "never", converged in the lab
    said_converges_did_not: int
    # The same error of the configuration's own median end (over its repeated runs) on
    # the compared rows run more than once: what the lab's repeatability allows a forecast
    # that knows nothing the other runs did not share.
    lab_rows: int = 0
    lab_median: float = math.nan
    lab_p90: float = math.nan


@dataclass(frozen=True)
class JobForecast:
    """A running job's first forecast of its end (``forecast``), as the coordinator makes it."""

    at_s: float  # job time of the sample it was made on
    converges: bool
    end_s: float  # job time it forecast the end at (inf: never)


def first_forecast(samples: Sequence[Observation]) -> JobForecast | None:
    """The first forecast the job's samples give, fed to ``forecast`` one at a time."""
    for i in range(1, len(samples) + 1):
        f = forecast(samples[:i])
        if f is not None:
            at_s = samples[i - 1].elapsed_s
            return JobForecast(at_s, f.converges, at_s + f.remaining_s)
    return None


def format_samples(samples: Iterable[Observation]) -> str:
    """``samples`` as the CSV column holds them."""
    return " ".join(
        f"{o.elapsed_s:.3f},{o.iteration},{o.remaining_bytes},{o.processed_bytes},"
        f"{o.bandwidth_bytes_per_s:.0f},{o.max_downtime_ms}"
        for o in samples
    )


def job_samples(row: LabRow) -> tuple[Observation, ...]:
    """The row's ``samples`` column read back (empty where the row has none)."""
    out = []
    for part in row.samples.split():
        v = dict(zip(SAMPLE_FIELDS, part.split(","), strict=True))
        iteration = int(v["iteration"])
        out.append(
            Observation(
                elapsed_s=float(v["elapsed_s"]),
                iteration=iteration,
                remaining_bytes=int(v["remaining_bytes"]),
                bandwidth_bytes_per_s=float(v["bandwidth"]),
                max_downtime_ms=int(v["limit_ms"]),
                first_pass_done=iteration >= 2,
                processed_bytes=int(v["processed_bytes"]),
            )
        )
    return tuple(out)


def row_forecast(row: LabRow) -> JobForecast | None:
    """The row's first forecast: made again on its samples where it has them (the forecast
    as it is now), else as recorded."""
    if row.samples:
        return first_forecast(job_samples(row))
    if row.forecast_converges is None:
        return None
    return JobForecast(row.forecast_at_s, row.forecast_converges, row.forecast_end_s)


def forecast_errors(rows: Sequence[LabRow]) -> ForecastReport:
    ends: dict[LabRow, list[float]] = {}
    for r in rows:
        if r.converged:
            ends.setdefault(_setup(r), []).append(r.total_s)
    with_forecast = [(r, f) for r in rows if (f := row_forecast(r)) is not None]
    errs: list[float] = []
    lab: list[float] = []
    never = wrong = 0
    for r, f in with_forecast:
        if r.converged and not f.converges:
            never += 1
        elif f.converges and not r.converged:
            wrong += 1
        elif r.converged and r.total_s > f.at_s:
            left_s = r.total_s - f.at_s
            errs.append(abs(f.end_s - r.total_s) / left_s)
            runs = ends[_setup(r)]
            if len(runs) > 1:
                lab.append(abs(_pct(runs, 0.5) - r.total_s) / left_s)
    return ForecastReport(
        rows=len(with_forecast),
        compared=len(errs),
        remaining_median=_pct(errs, 0.5),
        remaining_p90=_pct(errs, 0.9),
        said_never_converged=never,
        said_converges_did_not=wrong,
        lab_rows=len(lab),
        lab_median=_pct(lab, 0.5),
        lab_p90=_pct(lab, 0.9),
    )


@dataclass(frozen=True)
class Repeatability:
    """How far the lab's repeated runs of one configuration (every column the model reads)
    land from their own median: the noise no model of those columns gets under."""

    runs: int  # converged runs in configurations run more than once
    configurations: int
    total_median: float
    downtime_median: float
    total_p90: float = math.nan  # what a p90 of the total-time error cannot get under


def repeatability(rows: Sequence[LabRow]) -> Repeatability:
    by_config: dict[LabRow, list[LabRow]] = {}
    for r in rows:
        if r.converged:
            by_config.setdefault(_setup(r), []).append(r)
    repeated = [g for g in by_config.values() if len(g) > 1]

    def spread(values: Sequence[float]) -> list[float]:
        mid = _pct(values, 0.5)
        return [abs(v - mid) / mid for v in values] if mid > 0 else []

    tot = [d for g in repeated for d in spread([r.total_s for r in g])]
    down = [d for g in repeated for d in spread([r.downtime_ms for r in g])]
    return Repeatability(
        runs=sum(len(g) for g in repeated),
        configurations=len(repeated),
        total_median=_pct(tot, 0.5),
        downtime_median=_pct(down, 0.5),
        total_p90=_pct(tot, 0.9),
    )


def _score(rep: ErrorReport) -> float:
    parts = [x for x in (rep.total_median, rep.downtime_median) if math.isfinite(x)]
    return sum(parts) + rep.convergence_mismatch


def fit(
    rows: Sequence[LabRow], params: ModelParams = DEFAULT_PARAMS, passes: int = 2
) -> ModelParams:
    """Coordinate search: scale each overhead by a few factors, keep what lowers the error."""
    best = params
    best_score = _score(errors(rows, best))
    for _ in range(passes):
        for field in FIT_FIELDS:
            for factor in (0.5, 0.8, 1.25, 2.0):
                value = getattr(best, field) * factor
                if field == "link_efficiency":
                    value = min(1.0, value)
                cand = dataclasses.replace(best, **{field: value})
                score = _score(errors(rows, cand))
                if score < best_score:
                    best, best_score = cand, score
    return best


def _report(rep: ErrorReport) -> str:
    goal = "met" if rep.total_median <= GOAL_MEDIAN_ERROR else "NOT met"
    return (
        f"rows={rep.rows} compared={rep.compared} convergence_mismatch={rep.convergence_mismatch}"
        f" (predicted to converge, did not: {rep.false_convergence})\n"
        f"total_s error: median={rep.total_median:.1%} p90={rep.total_p90:.1%} (goal median <= 15%: {goal})\n"
        f"downtime_ms error: median={rep.downtime_median:.1%} p90={rep.downtime_p90:.1%}\n"
    )


def pattern_table(predicted: Sequence[Predicted]) -> str:
    """One line per writer (``LabRow.label``) and concurrency, then per writer, then all;
    beside the model's error, the lab's own spread on those rows (``repeatability``: how
    far repeated runs of one configuration land from their median), the error no model
    of the CSV's columns gets under ("-" where nothing was run twice)."""
    lines = [
        f"{'writer':<8} {'conc':>4} {'rows':>4} {'cmp':>4} {'median':>7} {'p90':>7} "
        f"{'false conv':>10} {'missed conv':>11} {'lab median':>10} {'lab p90':>7}"
    ]
    for (label, conc), ps in _cells(predicted, lambda p: p[0]):
        rep = error_report(ps)
        lab = repeatability([row for row, _ in ps])
        lines.append(
            f"{label:<8} {conc:>4} {rep.rows:>4} {rep.compared:>4} {rep.total_median:>7.1%} "
            f"{rep.total_p90:>7.1%} {rep.false_convergence:>10} "
            f"{rep.convergence_mismatch - rep.false_convergence:>11} "
            f"{_spread(lab.total_median, lab.runs):>10} {_spread(lab.total_p90, lab.runs):>7}"
        )
    return "\n".join(lines) + "\n"


def forecast_table(rows: Sequence[LabRow]) -> str:
    """``forecast_errors`` per writer and concurrency, then per writer, then all, beside
    what the lab's repeatability allows on the same rows ("-" where none ran twice)."""
    lines = [
        f"{'writer':<8} {'conc':>4} {'fcst':>4} {'cmp':>4} {'median':>7} {'p90':>7} "
        f"{'said never':>10} {'wrong conv':>10} {'lab median':>10} {'lab p90':>7}"
    ]
    for (label, conc), group in _cells(rows, lambda r: r):
        rep = forecast_errors(group)
        if not rep.rows:
            continue
        lines.append(
            f"{label:<8} {conc:>4} {rep.rows:>4} {rep.compared:>4} {rep.remaining_median:>7.1%} "
            f"{rep.remaining_p90:>7.1%} {rep.said_never_converged:>10} "
            f"{rep.said_converges_did_not:>10} {_spread(rep.lab_median, rep.lab_rows):>10} "
            f"{_spread(rep.lab_p90, rep.lab_rows):>7}"
        )
    return "\n".join(lines) + "\n"


def _cells(
    items: Sequence[_T], row_of: Callable[[_T], LabRow]
) -> list[tuple[tuple[str, str], list[_T]]]:
    """The items by their row's writer and concurrency, then by writer, then all together."""
    groups: dict[tuple[str, str], list[_T]] = {}
    for item in items:
        row = row_of(item)
        for key in ((row.label, str(row.concurrency)), (row.label, "all"), ("all", "all")):
            groups.setdefault(key, []).append(item)
    return sorted(groups.items(), key=lambda kv: (kv[0][0] == "all", kv[0]))


def _spread(value: float, runs: int) -> str:
    return f"{value:.1%}" if runs else "-"


def _forecast_report(rep: ForecastReport) -> str:
    return (
        f"rows with a forecast={rep.rows} compared={rep.compared}: remaining-time error "
        f"median={rep.remaining_median:.1%} p90={rep.remaining_p90:.1%}; said never but "
        f"converged={rep.said_never_converged}; said converges but did not="
        f"{rep.said_converges_did_not}\n"
        f"the configuration's own median end on the {rep.lab_rows} of them run more than"
        f" once (what the lab's repeatability allows): median={rep.lab_median:.1%}"
        f" p90={rep.lab_p90:.1%}\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compare the model with the lab's measurements.")
    ap.add_argument("csv", help="the lab's ground-truth CSV")
    ap.add_argument("--fit", action="store_true", help="also fit the overheads and report again")
    args = ap.parse_args(argv)
    with open(args.csv, newline="") as f:
        rows = read_rows(f)
    out = sys.stdout
    out.write("the planner's model, from the guests' configured rates and sets:\n")
    out.write(_report(errors(rows)))
    if any(r.measured for r in rows):
        measured = predictions(rows, DEFAULT_PARAMS, measured=True)
        out.write("the planner's model, from the agent's readings before each step:\n")
        out.write(_report(error_report(measured)))
        out.write("per writer and concurrency (from the readings):\n" + pattern_table(measured))
    if any(r.pattern for r in rows):
        out.write("per writer and concurrency (from the configuration):\n")
        out.write(pattern_table(predictions(rows)))
    out.write(
        "a sequential writer's behind-the-cursor share (the lab guest's seq walk only):\n"
        + _report(errors(rows, LAB_PARAMS))
    )
    if any(r.forecast_converges is not None or r.samples for r in rows):
        remade = sum(1 for r in rows if r.samples)
        out.write(
            "the running job's first forecast after its first pass"
            f" (made again on the samples of {remade} rows):\n"
        )
        out.write(_forecast_report(forecast_errors(rows)))
        if any(r.pattern for r in rows):
            out.write("per writer and concurrency:\n" + forecast_table(rows))
    rep = repeatability(rows)
    out.write(
        f"the lab's repeatability ({rep.runs} runs of {rep.configurations} configurations run"
        " more than once, from their own median):\n"
        f"total_s median={rep.total_median:.1%} p90={rep.total_p90:.1%}"
        f" downtime_ms median={rep.downtime_median:.1%}\n"
    )
    if args.fit:
        fitted = fit(rows)
        out.write("fitted parameters:\n" + _report(errors(rows, fitted)))
        for field in FIT_FIELDS:
            out.write(f"  {field} = {getattr(fitted, field):.4g}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
