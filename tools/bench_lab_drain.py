"""Drain one lab host three ways and compare: hostmaint, Nova's defaults, KubeVirt's.

Run as root: .venv/bin/python tools/bench_lab_drain.py [--spec etc/demo-lab.toml]
    [--nova-time-scale 1] [--kubevirt-progress-timeout-s 150]

One lab (the spec's hosts and guests, all on host 0). Each way starts from every
guest on host 0 (they are moved back through the agents in between):

- hostmaint: `Drain` through a coordinator daemon with the libvirt driver, at
  the spec's downtime limit.
- Nova default (`nova host-evacuate-live`): one at a time, in listing order,
  to the least loaded other host; started at Nova's first downtime step and
  stepped up as nova-compute's monitor does (live_migration_downtime 500 ms, 10
  steps, 75 s delay per GiB of RAM counted as at least 2 GiB), aborted after
  the completion timeout (800 s per GiB); no auto-converge, no post-copy. The
  delays and the timeout are multiplied by --nova-time-scale (printed; 1 by
  default: a scale below 1 hides what Nova's defaults cost). Nova's own code
  drives the migrations in tools/bench_nova_lab.py.
- KubeVirt default: two at a time, QEMU's 300 ms limit untouched, no tuning,
  aborted after 150 s without progress (remaining data not reaching a new low)
  or 150 s per GiB.

The baselines go through the agents' Migrate, WatchMigration and TuneMigration.
Real downtime is what QEMU reports for the finished job on the destination.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from hostmaint.coordinator import cliformat
from hostmaint.coordinator.baselines import NovaConf, downtime_steps
from hostmaint.lab import cluster
from hostmaint.lab.demo import (
    DEFAULT_SPEC,
    CoordinatorProcess,
    coordinator_config,
    free_port,
    guest_uuid,
    last_downtime_ms,
    load_demo,
    move_guests_to,
    placement,
)
from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import agent_pb2_grpc, coordinator_pb2_grpc
from hostmaint.protos import coordinator_pb2 as cpb

GIB = 1024**3


@dataclass
class VmResult:
    name: str
    ok: bool = False
    total_s: float = 0.0
    downtime_ms: float | None = None
    note: str = ""


@dataclass
class RunResult:
    way: str
    makespan_s: float = 0.0
    vms: dict[str, VmResult] = field(default_factory=dict)

    @property
    def failures(self) -> int:
        return sum(not v.ok for v in self.vms.values())


# ---- hostmaint -----------------------------------------------------------------------------


def drain_events(
    lab: cluster.Lab, work: Path, policy: cpb.DrainPolicy
) -> tuple[list[cpb.DrainEvent], float]:
    """`Drain` of host 0 through a coordinator daemon: its events and the call's seconds."""
    port = free_port()
    conf = work / "coordinator.conf"
    conf.write_text(
        coordinator_config(lab, work / "bench.db", port, max_downtime_ms=policy.max_downtime_ms)
    )
    coordinator = CoordinatorProcess(conf, port, work / "coordinator.log")
    coordinator.start()
    try:
        started = time.monotonic()
        with grpc.insecure_channel(coordinator.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            events = list(
                stub.Drain(cpb.DrainRequest(host=lab.hosts[0].name, policy=policy, reason="bench"))
            )
        return events, time.monotonic() - started
    finally:
        coordinator.stop()


def run_hostmaint(lab: cluster.Lab, work: Path, limit_ms: int) -> RunResult:
    events, seconds = drain_events(lab, work, cpb.DrainPolicy(max_downtime_ms=limit_ms))
    result = RunResult("hostmaint", makespan_s=seconds)
    status = events[-1].status
    for vm in status.vms:
        result.vms[vm.name] = VmResult(
            vm.name,
            ok=vm.state == cpb.VM_STATE_COMPLETED,
            total_s=vm.actual_total_s,
            note=",".join(vm.tuning_applied) or cliformat.tuning_label(vm.tuning),
        )
    return result


# ---- baselines -----------------------------------------------------------------------------


Controller = Callable[[float, apb.MigrationProgress], apb.TuneMigrationRequest | None]


def migrate_one(
    lab: cluster.Lab,
    guest: str,
    target: cluster.LabHost,
    options: apb.MigrateOptions,
    make_controller: Callable[[str], Controller],
) -> VmResult:
    """One migration through the source agent, steered by a controller on every sample."""
    source = lab.where(guest)
    uuid = guest_uuid(lab, guest)
    options.migration_uri = f"tcp://{target.migration_address}"
    controller = make_controller(uuid)
    result = VmResult(guest)
    started = time.monotonic()
    with grpc.insecure_channel(source.agent_address) as channel:
        stub = agent_pb2_grpc.HostAgentStub(channel)
        stub.Migrate(
            apb.MigrateRequest(domain_uuid=uuid, destination_uri=target.uri, options=options),
            timeout=30,
        )
        final = None
        samples = stub.WatchMigration(
            apb.WatchMigrationRequest(domain_uuid=uuid, interval_s=0.5, start_timeout_s=10),
            timeout=3600,
        )
        try:
            first = next(samples)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:  # gone already: finished before the watch
                raise
            samples = iter(())
        else:
            samples = itertools.chain([first], samples)
        for sample in samples:
            final = sample
            if sample.final:
                break
            tune = controller(time.monotonic() - started, sample)
            if tune is not None:
                try:
                    stub.TuneMigration(tune, timeout=30)
                    if tune.abort:
                        result.note = "aborted"
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.FAILED_PRECONDITION:  # the job just ended
                        raise
    result.total_s = time.monotonic() - started
    # Where the guest runs is the truth; the watch's last word is only the reason.
    deadline = time.monotonic() + 15
    while True:
        result.ok = [h.name for h in lab.running_on(guest)] == [target.name]
        if result.ok or time.monotonic() > deadline or (final is not None and final.error):
            break
        time.sleep(0.5)
    if not result.ok and not result.note:
        result.note = final.error if final is not None else "no result"
    return result


def _targets(lab: cluster.Lab) -> list[cluster.LabHost]:
    return lab.hosts[1:]


def _least_loaded(lab: cluster.Lab, guests: list[str], moved: dict[str, str]) -> cluster.LabHost:
    load = {h.name: 0 for h in _targets(lab)}
    for host in moved.values():
        if host in load:
            load[host] += 1
    name = min(load, key=lambda h: (load[h], h))
    return lab.host(name)


def run_nova(
    lab: cluster.Lab, guests: list[str], memory_gib: dict[str, float], scale: float
) -> RunResult:
    conf = NovaConf()
    result = RunResult("Nova default")
    moved: dict[str, str] = {}

    def controller_for(guest: str) -> Callable[[str], Controller]:
        data_gib = max(2.0, memory_gib[guest])
        steps = [(t * scale, ms) for t, ms in downtime_steps(conf, data_gib)]
        timeout_s = conf.completion_timeout_s_per_gib * data_gib * scale

        def make(uuid: str) -> Controller:
            applied = {0}

            def control(
                elapsed_s: float, _p: apb.MigrationProgress
            ) -> apb.TuneMigrationRequest | None:
                if elapsed_s > timeout_s:
                    return apb.TuneMigrationRequest(domain_uuid=uuid, abort=True)
                due = [i for i, (t, _) in enumerate(steps) if t <= elapsed_s and i not in applied]
                if not due:
                    return None
                applied.update(due)
                return apb.TuneMigrationRequest(
                    domain_uuid=uuid, max_downtime_ms=int(steps[max(due)][1])
                )

            return control

        return make

    started = time.monotonic()
    for guest in guests:  # one at a time, in listing order
        target = _least_loaded(lab, guests, moved)
        first_ms = int(downtime_steps(conf, 2.0)[0][1])
        options = apb.MigrateOptions(max_downtime_ms=first_ms)
        vm = migrate_one(lab, guest, target, options, controller_for(guest))
        if vm.ok:
            moved[guest] = target.name
        result.vms[guest] = vm
    result.makespan_s = time.monotonic() - started
    return result


def run_kubevirt(
    lab: cluster.Lab, guests: list[str], memory_gib: dict[str, float], progress_timeout_s: float
) -> RunResult:
    result = RunResult("KubeVirt default")
    lock = threading.Lock()
    queue = list(guests)
    moved: dict[str, str] = {}

    def make_for(guest: str) -> Callable[[str], Controller]:
        completion_s = 150.0 * max(memory_gib[guest], 1.0 / 1024)

        def make(uuid: str) -> Controller:
            best = {"remaining": float("inf"), "at": 0.0}

            def control(
                elapsed_s: float, p: apb.MigrationProgress
            ) -> apb.TuneMigrationRequest | None:
                remaining = p.data_remaining_bytes or p.memory_remaining_bytes
                if p.phase == apb.MIGRATION_PHASE_PRECOPY and remaining < best["remaining"]:
                    best["remaining"], best["at"] = remaining, elapsed_s
                stalled = elapsed_s - best["at"] > progress_timeout_s
                if stalled or elapsed_s > completion_s:
                    return apb.TuneMigrationRequest(domain_uuid=uuid, abort=True)
                return None

            return control

        return make

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                guest = queue.pop(0)
                target = _least_loaded(lab, guests, moved)
                moved[guest] = target.name  # reserved, as the scheduler would
            vm = migrate_one(lab, guest, target, apb.MigrateOptions(), make_for(guest))
            with lock:
                if not vm.ok:
                    moved.pop(guest, None)
                result.vms[guest] = vm

    started = time.monotonic()
    threads = [threading.Thread(target=worker, name=f"kubevirt-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.makespan_s = time.monotonic() - started
    return result


# ---- report --------------------------------------------------------------------------------


def _fill_downtimes(lab: cluster.Lab, result: RunResult) -> None:
    for vm in result.vms.values():
        if vm.ok:
            vm.downtime_ms = last_downtime_ms(lab, vm.name)


def render(results: list[RunResult], guests: list[str], limit_ms: int) -> str:
    lines = []
    header = f"{'':18}" + "".join(f"{r.way:>26}" for r in results)
    lines.append(header)
    lines.append(f"{'makespan s':18}" + "".join(f"{r.makespan_s:>26.1f}" for r in results))
    lines.append(f"{'failures':18}" + "".join(f"{r.failures:>26}" for r in results))
    lines.append(
        f"{'max downtime ms':18}"
        + "".join(f"{max((v.downtime_ms or 0) for v in r.vms.values()):>26.0f}" for r in results)
    )
    lines.append(
        f"{'over ' + str(limit_ms) + ' ms':18}"
        + "".join(
            f"{sum((v.downtime_ms or 0) > limit_ms for v in r.vms.values()):>26}" for r in results
        )
    )
    lines.append("per VM: time s / real downtime ms [note]")
    for g in guests:
        cells = []
        for r in results:
            v = r.vms.get(g)
            if v is None:
                cells.append(f"{'-':>26}")
                continue
            dt = "?" if v.downtime_ms is None else f"{v.downtime_ms:.0f}"
            text = (
                f"{v.total_s:.1f}/{dt}"
                + ("" if v.ok else " FAIL")
                + (f" {v.note}" if v.note and v.note != "none" else "")
            )
            cells.append(f"{text[:25]:>26}")
        lines.append(f"{g:18}" + "".join(cells))
    base = results[0]
    for r in results[1:]:
        lines.append(f"makespan {r.way} / {base.way}: {r.makespan_s / base.makespan_s:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC)
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--prefix", default="hm-ldb")
    parser.add_argument("--subnet", default="10.213.22.0/24")
    parser.add_argument(
        "--nova-time-scale",
        type=float,
        default=1.0,
        help=(
            "multiplies Nova's downtime-step delay and completion timeout (default 1: "
            "Nova's own; below 1 it understates what Nova's defaults cost)"
        ),
    )
    parser.add_argument("--kubevirt-progress-timeout-s", type=float, default=150.0)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    settings, plans = load_demo(args.spec)
    guests = [p.spec.name for p in plans]
    memory_gib = {p.spec.name: p.spec.memory_mib / 1024 for p in plans}
    work = Path(tempfile.mkdtemp(prefix="hm-ldb-"))
    config = cluster.LabConfig(
        prefix=args.prefix,
        state_dir=args.state_dir or work / "lab",
        subnet=args.subnet,
        rate_mbit=settings.rate_mbit,
    )
    plans = [cluster.GuestPlan(p.spec, 0) for p in plans]
    t0 = time.monotonic()
    lab, report = cluster.Lab.up(settings.hosts, plans, config)
    print(
        f"lab up in {time.monotonic() - t0:.0f}s, accelerator {report.accel} ({report.accel_reason})"
    )
    print(
        f"Nova's delays and completion timeout scaled by {args.nova_time_scale:g}: a step every "
        f"{75 * 2 * args.nova_time_scale:.1f}s for VMs up to 2 GiB, abort after "
        f"{800 * 2 * args.nova_time_scale:.0f}s; KubeVirt aborts after "
        f"{args.kubevirt_progress_timeout_s:g}s without progress"
    )
    results: list[RunResult] = []
    try:
        home = lab.hosts[0]
        ways: list[tuple[str, Callable[[], RunResult]]] = [
            ("hostmaint", lambda: run_hostmaint(lab, work, settings.max_downtime_ms)),
            ("Nova default", lambda: run_nova(lab, guests, memory_gib, args.nova_time_scale)),
            (
                "KubeVirt default",
                lambda: run_kubevirt(lab, guests, memory_gib, args.kubevirt_progress_timeout_s),
            ),
        ]
        for name, way in ways:
            move_guests_to(lab, guests, home)
            print(f"== {name}", flush=True)
            r = way()
            _fill_downtimes(lab, r)
            where = placement(lab, guests)
            twice = [g for g, hs in where.items() if len(hs) != 1]
            if twice:
                print(f"   PLACEMENT PROBLEM: {twice}")
            print(f"   makespan {r.makespan_s:.1f}s, failures {r.failures}", flush=True)
            results.append(r)
        print()
        print(render(results, guests, settings.max_downtime_ms))
    finally:
        lab.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
