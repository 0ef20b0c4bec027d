"""Ground truth for the convergence model: lab migrations measured one by one and 2-3 at once.

    sudo .venv/bin/python tools/bench_lab_csv.py [--out bench/lab-groundtruth.csv]
        [--prefix hm-lc] [--subnet 10.213.30.0/24] [--rate-mbit 400] [--quick]

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

from hostmaint.coordinator import calibrate
from hostmaint.lab import cluster
from hostmaint.lab.domains import GuestPlan
from hostmaint.lab.guest import GuestMode, GuestProgress, GuestSpec
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
EXTRA_COLUMNS = (
    "load_1m",
    "accel",
    "started_at",
    "guest",
    "source",
    "target",
    "wall_s",
    "rate_before_mibps",
    "rate_during_mibps",
    "max_throttle_pct",
    "sent_mib",
    "phase",
    "error",
)
COLUMNS = CALIBRATE_COLUMNS + EXTRA_COLUMNS


class Tuning(enum.StrEnum):
    PRECOPY = "precopy"
    AUTO_CONVERGE = "auto_converge"
    POSTCOPY = "postcopy"


def _spec(name: str, mib: int, fill: int, ws: int, rate: float, mode: GuestMode) -> GuestSpec:
    return GuestSpec(f"hm-lc-{name}", mib, ws, rate, mode, fill)


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
    return Step(tuple(f"hm-lc-{n}" for n in names.split()), tuning, limit_ms, bound_s)


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
) -> dict[str, str]:
    """The CSV row of one measured migration."""
    return {
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

    def __init__(self, lab: cluster.Lab, accel: str, out: IO[str]) -> None:
        self.lab = lab
        self.accel = accel
        self.specs = {name: _spec_of(lab, name) for name in lab.guest_names}
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

    def run(self, step: Step) -> None:
        self._gather(step)
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


def _spec_of(lab: cluster.Lab, name: str) -> GuestSpec:
    for g in GUESTS:
        if g.name == name:
            return g
    raise KeyError(f"guest {name} of the lab is not one of the bench's")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, default=Path("bench/lab-groundtruth.csv"))
    ap.add_argument("--prefix", default="hm-lc")
    ap.add_argument("--state-dir", type=Path, default=Path("/var/lib/hm-lc"))
    ap.add_argument("--subnet", default="10.213.30.0/24")
    ap.add_argument("--rate-mbit", type=int, default=cluster.DEFAULT_RATE_MBIT)
    ap.add_argument("--quick", action="store_true", help="two small guests, three steps")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    guests = [g for g in GUESTS if not args.quick or g.name in QUICK_GUESTS]
    steps = QUICK_STEPS if args.quick else STEPS
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
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", newline="") as out:
            bench = Bench(lab, report.accel, out)
            try:
                for step in steps:
                    try:
                        bench.run(step)
                    except Exception:  # loop boundary: one failed step must not end the run
                        LOG.exception("step failed, going on: %s", step)
                        bench.failed_steps += 1
            finally:
                bench.close()
        total_s = time.monotonic() - t0
        print(
            f"{bench.rows} rows ({bench.converged} converged, {bench.failed_steps} steps failed) "
            f"in {args.out}; "
            f"lab up {up_s:.0f}s, whole run {total_s:.0f}s"
        )
        for name in lab.guest_names:
            lab.where(name)  # every guest still runs exactly once
    finally:
        lab.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
