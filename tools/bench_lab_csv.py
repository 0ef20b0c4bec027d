"""Ground truth for the convergence model: lab migrations measured one by one and 2-3 at once.

    sudo .venv/bin/python tools/bench_lab_csv.py [--set sizes|patterns] [--out FILE]
        [--prefix hm-lc] [--subnet 10.213.30.0/24] [--rate-mbit 400] [--quick]

``--set patterns`` runs guests of each write pattern (sequential walk, uniform random,
hot/cold, bursty, CPU-bound) alone, two and three at once, into bench/lab-patterns.csv;
before each step the source agent measures the step's guests as the planner does (the
same windows), and each row has those readings beside the guest's configuration.

Starts a lab of two hosts and a fixed set of guests (256 MiB to 1 GiB; zero, partly and
mostly filled; paced writers from 0 to above the link and CPU-bound writers), then runs
``STEPS`` in order through the hosts' agents: each step migrates one guest, or two or
three identical guests at once out of the same host (so through the same shaped link),
to the other host, with a tuning (``precopy``, ``auto_converge``, ``postcopy`` switched
on after the first round) and a QEMU downtime limit. Guests move back and forth and are
never rebooted. A migration still running after the step's bound is aborted and written
with ``converged=false``.

One CSV row per migration, written as soon as it ends: first the columns
``hostmaint.coordinator.calibrate`` reads (``mode`` is ``<tuning>/<writer>``), then
``load_1m`` (1-minute load average when the step started), ``accel``, ``started_at``
(UTC), and details: guest, hosts, wall-clock time, the rate the guest itself reported
writing just before and during the migration, the top auto-converge throttle, bytes sent.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import enum
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc

from hostmaint.common.dirty import LONGER_WINDOW_LINK_SHARE, Reading, Writer, writer_of
from hostmaint.coordinator import calibrate, gather
from hostmaint.coordinator.agents import AgentClient
from hostmaint.coordinator.escalation import Observation
from hostmaint.coordinator.livemig import observation_of
from hostmaint.lab import cluster
from hostmaint.lab.domains import GuestPlan
from hostmaint.lab.guest import GuestMode, GuestPattern, GuestProgress, GuestSpec
from hostmaint.protos import agent_pb2 as pb
from hostmaint.protos import agent_pb2_grpc

LOG = logging.getLogger(__name__)

MIB = 1024 * 1024
RPC_TIMEOUT_S = 60.0
WATCH_INTERVAL_S = 0.25
WATCH_ATTEMPTS = 20
SETTLE_S = 1.0  # between steps: the previous target's guest resumes its writing
RETRY_CODES = (
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNKNOWN,
)

CALIBRATE_COLUMNS = calibrate.CSV_COLUMNS
# the load and the accelerator, then every column calibrate reads when present
EXTRA_COLUMNS = (
    "load_1m",
    "accel",
    *calibrate.CSV_OPTIONAL_COLUMNS,
    "measure_s",
    "guest",
    "source",
    "target",
    "rate_before_mibps",
    "rate_during_mibps",
    "max_throttle_pct",
    "sent_mib",
    "phase",
    "error",
)
COLUMNS = CALIBRATE_COLUMNS + EXTRA_COLUMNS


GUEST_PREFIX = "hm-lc-"


class Tuning(enum.StrEnum):
    PRECOPY = "precopy"
    AUTO_CONVERGE = "auto_converge"
    POSTCOPY = "postcopy"


def _spec(
    name: str,
    mib: int,
    fill: int,
    ws: int,
    rate: float,
    mode: GuestMode,
    pattern: GuestPattern = GuestPattern.SEQ,
) -> GuestSpec:
    return GuestSpec(f"{GUEST_PREFIX}{name}", mib, ws, rate, mode, fill, pattern=pattern)


PACED, CPU = GuestMode.PACED, GuestMode.CPU
# Boot writes fill + working set at about 0.14 s per MiB here: few large filled guests.
GUESTS: tuple[GuestSpec, ...] = (
    _spec("idle", 256, 0, 8, 0, PACED),
    *(_spec(f"a{i}", 256, 96, 32, 10, PACED) for i in (1, 2, 3)),
    *(_spec(f"b{i}", 512, 0, 64, 15, PACED) for i in (1, 2, 3)),
    _spec("p25", 256, 32, 96, 25, PACED),
    _spec("p40", 512, 0, 160, 40, PACED),
    _spec("p80", 512, 0, 160, 80, PACED),
    _spec("g0", 1024, 0, 32, 5, PACED),
    _spec("g192", 1024, 192, 32, 20, PACED),
    _spec("c4", 256, 32, 32, 4, CPU),
    _spec("c8", 512, 96, 32, 8, CPU),
)


@dataclass(frozen=True)
class Step:
    guests: tuple[str, ...]  # short names; more than one: identical guests sent at once
    tuning: Tuning = Tuning.PRECOPY
    downtime_limit_ms: int = 300
    bound_s: float = 60.0  # aborted (converged=false) when still running after this


def _step(
    names: str, tuning: Tuning = Tuning.PRECOPY, limit_ms: int = 300, bound_s: float = 60.0
) -> Step:
    return Step(tuple(f"{GUEST_PREFIX}{n}" for n in names.split()), tuning, limit_ms, bound_s)


AC, POST = Tuning.AUTO_CONVERGE, Tuning.POSTCOPY
STEPS: tuple[Step, ...] = (
    _step("idle"),
    _step("idle", limit_ms=100),
    _step("a1"),
    _step("a1", limit_ms=100),
    _step("b1"),
    _step("b1", limit_ms=1000),
    _step("p25"),
    _step("p25", limit_ms=1000),
    _step("p40"),
    _step("p40", limit_ms=1000),
    _step("p80", bound_s=45),
    _step("p80", AC, bound_s=45),
    _step("p80", POST),
    _step("g0"),
    _step("g192"),
    _step("g192", POST),
    _step("c4"),
    _step("c4", AC),
    _step("c8"),
    _step("c8", AC),
    _step("a1 a2"),
    _step("a1 a2", limit_ms=1000),
    _step("a1 a2 a3"),
    _step("b1 b2"),
    _step("b1 b2 b3", bound_s=60),
    _step("b1 b2 b3", POST),
    _step("p40", limit_ms=100),
    _step("a3"),
)
QUICK_GUESTS = ("hm-lc-idle", "hm-lc-c4")
QUICK_STEPS: tuple[Step, ...] = (_step("idle"), _step("c4", AC), _step("idle c4"))

# The write patterns (--set patterns): three identical guests of each, one pattern a group,
# each group moved alone (at two downtime limits), two and three at once. The rates are
# each pattern's write rate (bursty's while it writes, half the time); the agent's
# readings of each guest before each step are in the row beside the configured values.
SEQ, RANDOM, HOTCOLD, BURSTY = (
    GuestPattern.SEQ,
    GuestPattern.RANDOM,
    GuestPattern.HOTCOLD,
    GuestPattern.BURSTY,
)
PATTERN_GROUPS: tuple[tuple[str, int, int, int, float, GuestMode, GuestPattern], ...] = (
    ("seq", 384, 64, 96, 12, PACED, SEQ),
    ("rnd", 384, 64, 96, 16, PACED, RANDOM),
    ("hc", 384, 64, 128, 24, PACED, HOTCOLD),
    ("bur", 384, 64, 96, 24, PACED, BURSTY),
    ("cpu", 256, 32, 48, 8, CPU, SEQ),
)
PATTERN_GUESTS: tuple[GuestSpec, ...] = tuple(
    _spec(f"{g}{i}", mib, fill, ws, rate, mode, pattern)
    for g, mib, fill, ws, rate, mode, pattern in PATTERN_GROUPS
    for i in (1, 2, 3)
)
PATTERN_STEPS: tuple[Step, ...] = tuple(
    step
    for g, *_ in PATTERN_GROUPS
    for step in (
        _step(f"{g}1"),
        _step(f"{g}1", limit_ms=100),
        _step(f"{g}1 {g}2"),
        _step(f"{g}1 {g}2 {g}3"),
    )
)


@dataclass(frozen=True)
class GuestSet:
    guests: tuple[GuestSpec, ...]
    steps: tuple[Step, ...]
    out: Path
    # Only the step's group of guests runs (the others are paused meanwhile): on a small
    # lab machine fifteen writers would share two cores and slow every step alike.
    quiet_others: bool = False


SETS: dict[str, GuestSet] = {
    "sizes": GuestSet(GUESTS, STEPS, Path("bench/lab-groundtruth.csv")),
    "patterns": GuestSet(
        PATTERN_GUESTS, PATTERN_STEPS, Path("bench/lab-patterns.csv"), quiet_others=True
    ),
}
RESUME_SETTLE_S = 5.0  # a resumed guest catches up on its owed writes, then settles


def only_groups(
    guests: Sequence[GuestSpec], steps: Sequence[Step], groups: Sequence[str]
) -> tuple[list[GuestSpec], tuple[Step, ...]]:
    """The guests and steps of these groups; ValueError for a group with no guest."""
    unknown = [g for g in groups if not any(group_of(s.name) == g for s in guests)]
    if unknown:
        raise ValueError(f"no guests in groups {unknown}")
    kept = [s for s in guests if group_of(s.name) in groups]
    return kept, tuple(st for st in steps if group_of(st.guests[0]) in groups)


def group_of(name: str) -> str:
    """A guest's group: its name without the trailing number (``hm-lc-rnd2``: ``hm-lc-rnd``)."""
    return name.rstrip("0123456789")


# What the planner measures before it plans (the coordinator's [drain] defaults).
MEASURE_WINDOW_S = 2
MEASURE_MAX_WINDOW_S = 8


def plans(guests: Sequence[GuestSpec]) -> list[GuestPlan]:
    """Every guest starts on host 0, so the guests of a step share a source."""
    return [GuestPlan(spec, 0) for spec in guests]


def check_steps(guests: Sequence[GuestSpec], steps: Sequence[Step]) -> None:
    """ValueError unless every step names known guests, identical when sent together."""
    by_name = {g.name: g for g in guests}
    for step in steps:
        missing = [n for n in step.guests if n not in by_name]
        if missing:
            raise ValueError(f"step {step}: unknown guests {missing}")
        if len(set(step.guests)) != len(step.guests):
            raise ValueError(f"step {step}: a guest twice")
        shapes = {_shape(by_name[n]) for n in step.guests}
        if len(shapes) > 1 and len(step.guests) > 1:
            LOG.warning("step %s: guests differ; rows describe each guest as it is", step)


def _shape(spec: GuestSpec) -> tuple[int, int, int, float, GuestMode]:
    return (spec.memory_mib, spec.fill_mib, spec.working_set_mib, spec.dirty_rate_mibps, spec.mode)


@dataclass(frozen=True)
class Result:
    """One migration as measured; ``total_s`` is libvirt's job time (wall clock if absent)."""

    guest: str
    source: str
    target: str
    phase: str
    converged: bool
    total_s: float
    wall_s: float
    downtime_ms: float | None
    iterations: int
    rate_before_mibps: float | None
    rate_during_mibps: float | None
    max_throttle_pct: int
    sent_mib: float
    error: str
    forecast: ForecastLog | None = None


class ForecastLog:
    """A job's pre-copy progress samples, as the coordinator reads them, for its first
    forecast (``calibrate.first_forecast``) and the ``samples`` column."""

    def __init__(self) -> None:
        self.history: list[Observation] = []
        self.switched = False  # to post-copy: the samples end there

    def add(self, p: pb.MigrationProgress) -> None:
        self.switched = self.switched or p.phase == pb.MIGRATION_PHASE_POSTCOPY
        if self.switched or not p.memory_total_bytes:
            return
        self.history.append(observation_of(p, p.elapsed_ms / 1000.0))

    def columns(self) -> dict[str, str]:
        first = calibrate.first_forecast(self.history)
        samples = {"samples": calibrate.format_samples(self.history)}
        if first is None:
            return {**NO_FORECAST, **samples}
        return {
            "forecast_at_s": _fmt(first.at_s),
            "forecast_end_s": _fmt(first.end_s) if math.isfinite(first.end_s) else "inf",
            "forecast_converges": "true" if first.converges else "false",
            **samples,
        }


NO_FORECAST = {"forecast_at_s": "", "forecast_end_s": "", "forecast_converges": "", "samples": ""}


@dataclass(frozen=True)
class Measured:
    """What the source agent read of a guest's writing before its step, as the planner
    reads it: readings over doubling windows and the writer they describe."""

    readings: tuple[Reading, ...]
    writer: Writer
    measure_s: float

    @staticmethod
    def of(readings: Sequence[Reading], measure_s: float) -> Measured:
        return Measured(tuple(readings), writer_of(readings), measure_s)

    def columns(self) -> dict[str, str]:
        w = self.writer
        return {
            "measured_rate_mibps": _fmt(w.rate_bytes_per_s / MIB, 2),
            "measured_ws_mib": _fmt(
                None if w.working_set_bytes is None else w.working_set_bytes / MIB, 1
            ),
            "measured_floor_mibps": _fmt(
                None if w.rate_floor_bytes_per_s is None else w.rate_floor_bytes_per_s / MIB, 2
            ),
            "readings": " ".join(
                f"{r.window_s:g}:{r.bytes_per_s / MIB:.2f}" for r in self.readings
            ),
            "measure_s": _fmt(self.measure_s, 1),
        }


NOT_MEASURED = {
    c: ""
    for c in (
        "measured_rate_mibps",
        "measured_ws_mib",
        "measured_floor_mibps",
        "readings",
        "measure_s",
    )
}


def _fmt(x: float | None, digits: int = 3) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def row_of(
    spec: GuestSpec,
    step: Step,
    result: Result,
    *,
    link_mbit: int,
    load_1m: float,
    accel: str,
    started_at: str,
    measured: Measured | None = None,
) -> dict[str, str]:
    """The CSV row of one measured migration, in ``COLUMNS``' order."""
    row = {
        **(NOT_MEASURED if measured is None else measured.columns()),
        **(NO_FORECAST if result.forecast is None else result.forecast.columns()),
        "pattern": spec.pattern.value,
        "size_mib": str(spec.memory_mib),
        "fill_mib": str(spec.fill_mib),
        "working_set_mib": str(spec.working_set_mib),
        "dirty_rate_mibps": f"{spec.dirty_rate_mibps:g}",
        "mode": f"{step.tuning.value}/{spec.mode.value}",
        "link_mbit": str(link_mbit),
        "concurrency": str(len(step.guests)),
        "downtime_limit_ms": str(step.downtime_limit_ms),
        "total_s": _fmt(result.total_s),
        "downtime_ms": _fmt(result.downtime_ms if result.converged else None, 0),
        "iterations": str(result.iterations),
        "converged": "true" if result.converged else "false",
        "load_1m": f"{load_1m:.2f}",
        "accel": accel,
        "started_at": started_at,
        "guest": result.guest,
        "source": result.source,
        "target": result.target,
        "wall_s": _fmt(result.wall_s),
        "rate_before_mibps": _fmt(result.rate_before_mibps, 2),
        "rate_during_mibps": _fmt(result.rate_during_mibps, 2),
        "max_throttle_pct": str(result.max_throttle_pct),
        "sent_mib": _fmt(result.sent_mib, 1),
        "phase": result.phase,
        "error": result.error.replace("\n", " ")[:200],
    }
    return {c: row[c] for c in COLUMNS}


def mean_rate(events: Iterable[GuestProgress]) -> float | None:
    rates = [e.rate_mibps for e in events]
    return sum(rates) / len(rates) if rates else None


@dataclass
class _Running:
    spec: GuestSpec
    uuid: str
    source: cluster.LabHost
    target: cluster.LabHost
    stub: agent_pb2_grpc.HostAgentStub
    started: float
    events_before: int
    rate_before_mibps: float | None


class Bench:
    """Runs steps on a lab through its agents and writes one row per migration."""

    def __init__(
        self,
        lab: cluster.Lab,
        accel: str,
        out: IO[str],
        guests: Sequence[GuestSpec],
        quiet_others: bool = False,
    ) -> None:
        self.quiet_others = quiet_others
        self.lab = lab
        self.accel = accel
        by_name = {g.name: g for g in guests}
        self.specs = {name: by_name[name] for name in lab.guest_names}
        self.channels = {h.name: grpc.insecure_channel(h.agent_address) for h in lab.hosts}
        self.stubs = {n: agent_pb2_grpc.HostAgentStub(c) for n, c in self.channels.items()}
        self.uuids: dict[str, str] = {}
        self.writer = csv.DictWriter(out, fieldnames=list(COLUMNS))
        self.writer.writeheader()
        self.out = out
        self.rows = 0
        self.converged = 0
        self.failed_steps = 0

    def close(self) -> None:
        for c in self.channels.values():
            c.close()

    def _uuid(self, name: str) -> str:
        if name not in self.uuids:
            for stub in self.stubs.values():
                listed = stub.ListDomains(pb.ListDomainsRequest(), timeout=RPC_TIMEOUT_S)
                self.uuids.update({d.name: d.uuid for d in listed.domains})
        return self.uuids[name]

    def _progress(self, name: str) -> list[GuestProgress]:
        return [e for e in self.lab.guest_events(name) if isinstance(e, GuestProgress)]

    def _measure(self, names: Sequence[str]) -> dict[str, Measured]:
        """The planner's readings of the guests (all on one host), taken as it takes them."""
        source = self.lab.where(names[0])
        client = AgentClient(
            source.name, source.agent_address, self.channels[source.name], RPC_TIMEOUT_S
        )
        uuids = {self._uuid(n): n for n in names}
        domains = {d.uuid: d for d in client.list_domains(list(uuids))}
        started = time.monotonic()
        link = self.lab.rate_mbit * 1e6 / 8
        readings = gather.measure_fresh(
            client,
            domains,
            list(uuids),
            MEASURE_WINDOW_S,
            MEASURE_MAX_WINDOW_S,
            link * LONGER_WINDOW_LINK_SHARE,
            lambda text: LOG.info("measuring: %s", text),
        )
        took = time.monotonic() - started
        return {uuids[u]: Measured.of(rs, took) for u, rs in readings.items()}

    def _pause_others(self, keep: set[str] | None) -> None:
        """Pauses the bench's guests outside the groups ``keep`` and resumes those in them
        that it paused (``keep`` None: resumes all)."""
        import libvirt  # noqa: TID251  (the bench quiets its own guests, not the agent's)

        resumed = False
        for host in self.lab.hosts:
            conn = libvirt.open(host.uri)
            try:
                for dom in conn.listAllDomains():
                    if dom.name() not in self.specs:
                        continue
                    state, reason = dom.state()
                    wanted = keep is None or group_of(dom.name()) in keep
                    if wanted and (state, reason) == (
                        libvirt.VIR_DOMAIN_PAUSED,
                        libvirt.VIR_DOMAIN_PAUSED_USER,
                    ):
                        dom.resume()
                        resumed = True
                    elif not wanted and state == libvirt.VIR_DOMAIN_RUNNING:
                        dom.suspend()
            finally:
                conn.close()
        if resumed:
            time.sleep(RESUME_SETTLE_S)

    def resume_all(self) -> None:
        if self.quiet_others:
            self._pause_others(None)

    def run(self, step: Step) -> None:
        if self.quiet_others:
            self._pause_others({group_of(n) for n in step.guests})
        self._gather(step)
        try:
            measured = self._measure(step.guests)
        except Exception:  # loop boundary: a row without readings is still ground truth
            LOG.exception("measuring failed, the step's rows have no readings: %s", step)
            measured = {}
        load_1m = os.getloadavg()[0]
        started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        jobs = [self._start(name, step) for name in step.guests]
        with ThreadPoolExecutor(len(jobs), thread_name_prefix="follow") as pool:
            results = list(pool.map(lambda j: self._follow(j, step), jobs))
        for job, res in zip(jobs, results, strict=True):
            row = row_of(
                job.spec,
                step,
                res,
                link_mbit=self.lab.rate_mbit,
                load_1m=load_1m,
                accel=self.accel,
                started_at=started_at,
                measured=measured.get(job.spec.name),
            )
            self.writer.writerow(row)
            self.rows += 1
            self.converged += res.converged
            LOG.info(
                "measured guest=%s mode=%s concurrency=%d limit_ms=%d converged=%s total_s=%.1f "
                "downtime_ms=%s iterations=%d rate_during=%s load=%.2f",
                res.guest,
                row["mode"],
                len(step.guests),
                step.downtime_limit_ms,
                res.converged,
                res.total_s,
                row["downtime_ms"],
                res.iterations,
                row["rate_during_mibps"],
                load_1m,
            )
        self.out.flush()
        time.sleep(SETTLE_S)

    def _gather(self, step: Step) -> None:
        """Moves the step's guests to one host first (each move measured as a row)."""
        if len(step.guests) < 2:
            return
        where = {n: self.lab.where(n).name for n in step.guests}
        home, _ = Counter(where.values()).most_common(1)[0]
        for name, host in where.items():
            if host != home:
                LOG.info("gathering guest=%s from=%s to=%s", name, host, home)
                self.run(Step((name,), Tuning.PRECOPY, step.downtime_limit_ms, step.bound_s))

    def _start(self, name: str, step: Step) -> _Running:
        source = self.lab.where(name)
        target = next(h for h in self.lab.hosts if h.name != source.name)
        progress = self._progress(name)
        opts = pb.MigrateOptions(
            max_downtime_ms=step.downtime_limit_ms,
            auto_converge=step.tuning is Tuning.AUTO_CONVERGE,
            allow_postcopy=step.tuning is Tuning.POSTCOPY,
            migration_uri=f"tcp://{target.migration_address}",
        )
        stub = self.stubs[source.name]
        uuid = self._uuid(name)
        started = time.monotonic()
        stub.Migrate(
            pb.MigrateRequest(domain_uuid=uuid, destination_uri=target.uri, options=opts),
            timeout=RPC_TIMEOUT_S,
        )
        return _Running(
            spec=self.specs[name],
            uuid=uuid,
            source=source,
            target=target,
            stub=stub,
            started=started,
            events_before=len(progress),
            rate_before_mibps=progress[-1].rate_mibps if progress else None,
        )

    def _tune(self, job: _Running, **fields: bool) -> None:
        try:
            job.stub.TuneMigration(
                pb.TuneMigrationRequest(domain_uuid=job.uuid, **fields), timeout=RPC_TIMEOUT_S
            )
        except grpc.RpcError as exc:  # the job may have ended between the sample and the call
            LOG.warning("tune refused guest=%s fields=%s: %s", job.spec.name, fields, exc)

    def _outcome_without_watch(
        self, job: _Running, last: pb.MigrationProgress
    ) -> pb.MigrationProgress:
        """The final sample was lost: where the guest runs once it settles tells the outcome."""
        deadline = time.monotonic() + UNKNOWN_OUTCOME_WAIT_S
        while True:
            hosts = [h.name for h in self.lab.running_on(job.spec.name)]
            done = outcome_of_placement(job.source.name, job.target.name, hosts)
            if done is True:
                return _completed_on_target(job)
            if done is False:
                failed = pb.MigrationProgress()
                failed.CopyFrom(last)
                failed.final = True
                failed.phase = pb.MIGRATION_PHASE_FAILED
                failed.error = "no final sample; the guest still runs on the source"
                return failed
            if time.monotonic() >= deadline:
                raise OutcomeUnknown(job.spec.name, hosts)
            time.sleep(0.5)

    def _follow(self, job: _Running, step: Step) -> Result:
        last = pb.MigrationProgress()
        throttle = 0
        switched = aborted = False
        log = ForecastLog()
        for attempt in range(WATCH_ATTEMPTS):
            stream = job.stub.WatchMigration(
                pb.WatchMigrationRequest(
                    domain_uuid=job.uuid, interval_s=WATCH_INTERVAL_S, start_timeout_s=10
                ),
                timeout=step.bound_s + 300,
            )
            try:
                for p in stream:
                    last = p
                    throttle = max(throttle, p.auto_converge_throttle_pct)
                    if not p.final and step.tuning is Tuning.PRECOPY:
                        log.add(p)
                    if p.final:
                        break
                    running_s = time.monotonic() - job.started
                    if step.tuning is Tuning.POSTCOPY and not switched and p.iteration >= 2:
                        self._tune(job, start_postcopy=True)
                        switched = True
                    if running_s > step.bound_s and not aborted and not switched:
                        LOG.info("aborting guest=%s after %.0fs", job.spec.name, running_s)
                        self._tune(job, abort=True)
                        aborted = True
            except grpc.RpcError as exc:
                # Race: the agent sampled while the source's domain stopped after the
                # switch-over ("domain is not running", then "no domain"): the final
                # sample is lost; the target keeps the completed job's statistics.
                # The agent also failed a sample here once (UNKNOWN): watch again as well.
                if exc.code() not in RETRY_CODES:
                    raise
                if job.target in self.lab.running_on(job.spec.name):
                    last = _completed_on_target(job)
                    break
                LOG.info(
                    "watch again guest=%s attempt=%d: %s", job.spec.name, attempt, exc.details()
                )
                time.sleep(0.3)
                continue
            finally:
                stream.cancel()
            if last.final:
                break
        if not last.final:
            last = self._outcome_without_watch(job, last)
        wall_s = time.monotonic() - job.started
        during = self._progress(job.spec.name)[job.events_before :]
        converged = last.final and last.phase == pb.MIGRATION_PHASE_COMPLETED
        return Result(
            guest=job.spec.name,
            source=job.source.name,
            target=job.target.name,
            phase=pb.MigrationPhase.Name(last.phase).removeprefix("MIGRATION_PHASE_").lower(),
            converged=converged,
            total_s=last.elapsed_ms / 1000.0 if last.elapsed_ms else wall_s,
            wall_s=wall_s,
            downtime_ms=float(last.downtime_ms) if converged else None,
            iterations=int(last.iteration),
            rate_before_mibps=job.rate_before_mibps,
            rate_during_mibps=mean_rate(during),
            max_throttle_pct=throttle,
            sent_mib=last.memory_processed_bytes / MIB,
            error=last.error,
            forecast=log,
        )


UNKNOWN_OUTCOME_WAIT_S = 15.0


class OutcomeUnknown(Exception):
    def __init__(self, guest: str, running_on: list[str]) -> None:
        super().__init__(f"guest {guest}: no final sample, running on {running_on}")
        self.guest = guest
        self.running_on = running_on


def outcome_of_placement(
    job_source: str, job_target: str, running_on: Sequence[str]
) -> bool | None:
    """Completed (True), not (False), or unknown (None) from where the guest runs."""
    if list(running_on) == [job_target]:
        return True
    if list(running_on) == [job_source]:
        return False
    return None


def _completed_on_target(job: _Running) -> pb.MigrationProgress:
    """The completed job as the target's libvirt recorded it, in the agent's terms."""
    import libvirt  # noqa: TID251  (a fallback of the bench, not of the agent)

    conn = libvirt.open(job.target.uri)
    try:
        stats = conn.lookupByUUIDString(job.uuid).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    finally:
        conn.close()
    return pb.MigrationProgress(
        domain_uuid=job.uuid,
        phase=pb.MIGRATION_PHASE_COMPLETED,
        iteration=int(stats.get("memory_iteration", 0)),
        memory_processed_bytes=int(stats.get("memory_processed", 0)),
        downtime_ms=int(stats.get("downtime", 0)),
        elapsed_ms=int(stats.get("time_elapsed", 0)),
        final=True,
        error="stats from the target",
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument(
        "--set",
        choices=sorted(SETS),
        default="sizes",
        help="sizes: guests of many sizes, rates and tunings; patterns: each write pattern "
        "alone, two and three at once",
    )
    ap.add_argument(
        "--out",
        type=Path,
        help="default: bench/lab-groundtruth.csv (sizes), bench/lab-patterns.csv (patterns)",
    )
    ap.add_argument("--prefix", default="hm-lc")
    ap.add_argument("--state-dir", type=Path, default=Path("/var/lib/hm-lc"))
    ap.add_argument("--subnet", default="10.213.30.0/24")
    ap.add_argument("--rate-mbit", type=int, default=cluster.DEFAULT_RATE_MBIT)
    ap.add_argument("--quick", action="store_true", help="two small guests, three steps")
    ap.add_argument(
        "--only",
        action="append",
        metavar="GROUP",
        help="only the steps and guests of this group (a guest name without its number, "
        "e.g. rnd); repeatable",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    chosen = SETS[args.set]
    out_path: Path = args.out or chosen.out
    guests, steps = list(chosen.guests), chosen.steps
    if args.only:
        guests, steps = only_groups(guests, steps, [f"{GUEST_PREFIX}{g}" for g in args.only])
    if args.quick:
        guests, steps = [g for g in GUESTS if g.name in QUICK_GUESTS], QUICK_STEPS
    check_steps(guests, steps)
    config = cluster.LabConfig(
        prefix=args.prefix,
        state_dir=args.state_dir,
        subnet=args.subnet,
        rate_mbit=args.rate_mbit,
        wait_guests=False,
    )
    t0 = time.monotonic()
    lab, report = cluster.Lab.up(2, plans(guests), config)
    try:
        lab.wait_guests_ready(timeout_s=900)
        up_s = time.monotonic() - t0
        LOG.info("lab up accel=%s guests=%d ready_s=%.0f", report.accel, len(guests), up_s)
        if report.agent_failures:
            raise SystemExit(f"agents failed: {report.agent_failures}")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with out_path.open("w", newline="") as out:
            bench = Bench(lab, report.accel, out, guests, chosen.quiet_others)
            try:
                for step in steps:
                    try:
                        bench.run(step)
                    except Exception:  # loop boundary: one failed step must not end the run
                        LOG.exception("step failed, going on: %s", step)
                        bench.failed_steps += 1
            finally:
                bench.resume_all()
                bench.close()
        total_s = time.monotonic() - t0
        print(
            f"{bench.rows} rows ({bench.converged} converged, {bench.failed_steps} steps failed) "
            f"in {out_path}; "
            f"lab up {up_s:.0f}s, whole run {total_s:.0f}s"
        )
        for name in lab.guest_names:
            lab.where(name)  # every guest still runs exactly once
    finally:
        lab.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
