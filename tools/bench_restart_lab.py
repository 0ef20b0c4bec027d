"""Drain one lab host with the coordinator SIGKILLed mid-drain and restarted, and compare.

Run as root: .venv/bin/python tools/bench_restart_lab.py [--limit-ms 1000]
    [--rate-mbit 400] [--restart-delay-s 0] [--points first-pass,mid-rounds,after-switch]

One lab of three hosts (links shaped to --rate-mbit) with four guests on host 0:
`fast` rewrites a 128 MiB set at 80 MiB/s, faster than the link carries it
(planned for post-copy after its first pass), `hot` rewrites 32 MiB at 80 MiB/s
(planned rounds of pre-copy, then post-copy or a raised limit), `db` needs
several pre-copy rounds, `big` is mostly static. Policy: the downtime limit,
post-copy allowed. Every run starts with every guest on host 0 (moved back
through the agents in between), with a coordinator daemon (libvirt driver) of
its own journal.

Runs: the drain with no kill, then once per kill point with the coordinator
SIGKILLed when the drain's event stream shows it, and at once (or after
--restart-delay-s) a new coordinator started on the same journal, which
resumes the drain:

- first-pass: a migration planned for post-copy is in its first pass over RAM;
- mid-rounds: a pre-copy migration is in its third round or later;
- after-switch: just after a post-copy switch or a burst (the link held).

A kill point the drain never reaches is reported as such (the drain ran
unkilled). The table: when the kill came (since the drain was asked for) and
which VM's event triggered it; how soon the restarted coordinator acted (from
its launch to its first re-attach, progress, start or tuning in its log, the
process's start-up included); the drain's makespan (the journal's created to
finished, the outage included) and its ratio to the no-kill drain; the same
from the first migration's start (planning measures dirty rates, whose time
varies from run to run: the first drain after the lab is up plans longest)
and its ratio; the migrations aborted (abort steps done); the attempts per VM; the VMs that run
once and off host 0; and the drain's end. The journals and the coordinators'
logs are kept in the work directory printed at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from hostmaint.coordinator.cliview import FINISHED_DRAIN_STATES
from hostmaint.coordinator.journal import Journal, make_engine
from hostmaint.lab import cluster
from hostmaint.lab.demo import (
    CoordinatorProcess,
    coordinator_config,
    free_port,
    move_guests_to,
    placement,
    placement_problems,
)
from hostmaint.lab.errors import LabError
from hostmaint.lab.guest import GuestMode, GuestSpec
from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import coordinator_pb2 as cpb
from hostmaint.protos import coordinator_pb2_grpc

MIB = 1024 * 1024
PREFIX = "hm-lrs"
GUESTS = [
    GuestSpec(f"{PREFIX}-fast", 256, 128, 80, GuestMode.PACED, 0),
    GuestSpec(f"{PREFIX}-hot", 256, 32, 80, GuestMode.PACED, 0),
    GuestSpec(f"{PREFIX}-db", 256, 48, 16, GuestMode.PACED, 16),
    GuestSpec(f"{PREFIX}-big", 512, 32, 4, GuestMode.PACED, 96),
]
NAMES = [g.name for g in GUESTS]
DRAIN_TIMEOUT_S = 900.0
# A restarted coordinator acting: re-attaching to a migration, or a drain event of one.
_ACTION = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*"
    r"(re-attaching to migration|kind=(progress|tuned|migration_started))"
)

# Whether the coordinator is killed at this event, given the drain's plan so far.
KillAt = Callable[[cpb.DrainEvent, dict[str, cpb.PlannedMigration]], bool]


def _first_pass(event: cpb.DrainEvent, plan: dict[str, cpb.PlannedMigration]) -> bool:
    planned = plan.get(event.vm_uuid)
    p = event.progress
    return (
        event.kind == cpb.DRAIN_EVENT_KIND_PROGRESS
        and planned is not None
        and planned.tuning == cpb.TUNING_POSTCOPY
        and p.iteration <= 1
        and p.memory_processed_bytes >= 16 * MIB
    )


def _mid_rounds(event: cpb.DrainEvent, plan: dict[str, cpb.PlannedMigration]) -> bool:
    p = event.progress
    return (
        event.kind == cpb.DRAIN_EVENT_KIND_PROGRESS
        and p.phase == apb.MIGRATION_PHASE_PRECOPY
        and p.iteration >= 3
    )


def _after_switch(event: cpb.DrainEvent, plan: dict[str, cpb.PlannedMigration]) -> bool:
    return event.kind == cpb.DRAIN_EVENT_KIND_TUNED and event.message.startswith(
        ("postcopy", "hold_link")
    )


KILL_POINTS: dict[str, KillAt] = {
    "first-pass": _first_pass,
    "mid-rounds": _mid_rounds,
    "after-switch": _after_switch,
}


@dataclass
class Row:
    name: str
    killed_at_s: float | None = None  # since the drain was asked for; None: not killed
    killed_during: str = ""
    first_action_s: float | None = None  # from the restarted coordinator's launch
    makespan_s: float = 0.0
    migrating_s: float = 0.0  # from the first migration's start to the drain's end
    aborted: int = 0
    attempts: dict[str, int] | None = None
    moved: int = 0
    state: str = ""
    problems: tuple[str, ...] = ()


def _short(name: str) -> str:
    return name.removeprefix(PREFIX + "-")


def _await_terminal(address: str, host: str) -> cpb.DrainStatus:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    with grpc.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        while True:
            status: cpb.DrainStatus = stub.GetDrain(cpb.GetDrainRequest(host=host), timeout=30)
            if status.state in FINISHED_DRAIN_STATES or time.monotonic() > deadline:
                return status
            time.sleep(0.5)


def _coordinator(
    lab: cluster.Lab, work: Path, db: Path, name: str, limit_ms: int
) -> CoordinatorProcess:
    """A coordinator daemon of the journal `db`, not yet started (its own port and log)."""
    port = free_port()
    conf = work / f"{name}.conf"
    conf.write_text(coordinator_config(lab, db, port, max_downtime_ms=limit_ms))
    return CoordinatorProcess(conf, port, work / f"{name}.log")


def _first_action_s(log: Path, launched: float) -> float | None:
    """Seconds from `launched` (epoch) to the first action the coordinator logged."""
    for line in log.read_text(errors="replace").splitlines():
        m = _ACTION.match(line)
        if m:
            at = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
            return at + int(m.group(2)) / 1000 - launched
    return None


def run_once(
    lab: cluster.Lab, work: Path, name: str, kill_at: KillAt | None, args: argparse.Namespace
) -> Row:
    """One drain of host 0, the coordinator killed at `kill_at` (None: never)."""
    host = lab.hosts[0].name
    db = work / f"{name}.db"
    coordinator = _coordinator(lab, work, db, name, args.limit_ms)
    coordinator.start()
    row = Row(name)
    plan: dict[str, cpb.PlannedMigration] = {}
    names: dict[str, str] = {}
    asked = time.monotonic()
    restarted: CoordinatorProcess | None = None
    try:
        policy = cpb.DrainPolicy(max_downtime_ms=args.limit_ms, allow_postcopy=True)
        with grpc.insecure_channel(coordinator.address) as channel:
            stream = coordinator_pb2_grpc.CoordinatorStub(channel).Drain(
                cpb.DrainRequest(host=host, policy=policy, reason=f"bench {name}")
            )
            for event in stream:
                if event.kind == cpb.DRAIN_EVENT_KIND_PLANNED:
                    plan = {m.vm_uuid: m for m in event.plan.migrations}
                    names = {m.vm_uuid: m.name for m in event.plan.migrations}
                if kill_at is not None and kill_at(event, plan):
                    coordinator.kill()
                    row.killed_at_s = time.monotonic() - asked
                    row.killed_during = _short(names.get(event.vm_uuid, event.vm_uuid[:8]))
                    break
                if event.kind == cpb.DRAIN_EVENT_KIND_FINISHED:
                    break
        if row.killed_at_s is not None:
            time.sleep(args.restart_delay_s)
            restarted = _coordinator(lab, work, db, f"{name}-restarted", args.limit_ms)
            launched = time.time()
            restarted.start()
            status = _await_terminal(restarted.address, host)
            row.first_action_s = _first_action_s(restarted.log_path, launched)
        else:
            status = _await_terminal(coordinator.address, host)
    finally:
        coordinator.kill()
        if restarted is not None:
            restarted.stop()
    journal = Journal(make_engine(f"sqlite:///{db}"), clock=time.time)
    drain = journal.drain(status.drain_id)
    ended = drain.finished_at or time.time()
    row.makespan_s = ended - drain.created_at
    steps = journal.steps(status.drain_id)
    starts = [s.at for s in steps if s.action == "start_migration"]
    row.migrating_s = ended - min(starts, default=drain.created_at)
    row.aborted = sum(
        1
        for s in steps
        if s.action == "tune" and str(s.detail.get("action")) == "abort" and s.state == "done"
    )
    row.attempts = {_short(r.name): r.attempts for r in journal.vms(status.drain_id)}
    where = placement(lab, NAMES)
    row.moved = sum(1 for hosts in where.values() if len(hosts) == 1 and hosts[0] != host)
    row.state = cpb.DrainState.Name(status.state).removeprefix("DRAIN_STATE_").lower()
    row.problems = tuple(placement_problems(where, host))
    return row


def render(rows: list[Row]) -> str:
    base = rows[0].makespan_s or 1.0
    base_migrating = rows[0].migrating_s or 1.0
    lines = [
        f"{'run':14}{'killed at s':>12}  {'during':8}{'1st act s':>10}{'makespan s':>11}"
        f"{'ratio':>7}{'migrating s':>12}{'ratio':>7}{'aborted':>8}  {'attempts':28}"
        f"{'moved':>6}  end"
    ]
    for r in rows:
        killed = "-" if r.name == "no-kill" else "not reached"
        if r.killed_at_s is not None:
            killed = f"{r.killed_at_s:.1f}"
        first = "-" if r.first_action_s is None else f"{r.first_action_s:.1f}"
        attempts = " ".join(f"{k}={v}" for k, v in sorted((r.attempts or {}).items()))
        lines.append(
            f"{r.name:14}{killed:>12}  {r.killed_during or '-':8}{first:>10}"
            f"{r.makespan_s:>11.1f}{r.makespan_s / base:>7.2f}{r.migrating_s:>12.1f}"
            f"{r.migrating_s / base_migrating:>7.2f}{r.aborted:>8}  {attempts:28}"
            f"{r.moved:>3}/{len(NAMES)}  {r.state}{'; ' + '; '.join(r.problems) if r.problems else ''}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-ms", type=int, default=1000)
    parser.add_argument("--rate-mbit", type=int, default=400)
    parser.add_argument(
        "--restart-delay-s",
        type=float,
        default=0.0,
        help="how long the coordinator stays down before the restart (default: none)",
    )
    parser.add_argument(
        "--points",
        default=",".join(KILL_POINTS),
        help=f"kill points, comma-separated (of {', '.join(KILL_POINTS)})",
    )
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--subnet", default="10.213.27.0/24")
    args = parser.parse_args(argv)
    points = [p for p in args.points.split(",") if p]
    unknown = [p for p in points if p not in KILL_POINTS]
    if unknown:
        parser.error(f"unknown kill points {unknown}: use {', '.join(KILL_POINTS)}")
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="hm-lrs-"))
    config = cluster.LabConfig(
        prefix=PREFIX,
        state_dir=args.state_dir or work / "lab",
        subnet=args.subnet,
        rate_mbit=args.rate_mbit,
    )
    t0 = time.monotonic()
    lab, report = cluster.Lab.up(3, [cluster.GuestPlan(g, 0) for g in GUESTS], config)
    print(f"lab up in {time.monotonic() - t0:.0f}s, accelerator {report.accel}", flush=True)
    rows: list[Row] = []
    try:
        runs: list[tuple[str, KillAt | None]] = [("no kill", None)]
        runs += [(p, KILL_POINTS[p]) for p in points]
        for name, kill_at in runs:
            move_guests_to(lab, NAMES, lab.hosts[0])
            print(f"== {name}", flush=True)
            try:
                rows.append(run_once(lab, work, name.replace(" ", "-"), kill_at, args))
            except (grpc.RpcError, LabError, OSError) as e:  # reported; the others still run
                print(f"{name}: failed: {e!r}", file=sys.stderr, flush=True)
                rows.append(Row(name.replace(" ", "-"), state=f"error: {e}"))
            print(render(rows[-1:] if len(rows) == 1 else [rows[0], rows[-1]]), flush=True)
    finally:
        lab.down()
        print(f"work dir (journals, coordinator logs): {work}")
    print()
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
