"""Drain one lab host four ways, through Nova's own libvirt driver, Nova's timings unscaled.

Run as root: .venv/bin/python tools/bench_nova_lab.py [--rows a,b,c,d] [--cap-s 1800]
    [--limit-ms 500]

Each row starts from a fresh lab of three hosts (a 400 Mbit/s link each way)
and a fresh Nova (lab/novalab.py: nova-compute runs
`nova.virt.libvirt.LibvirtDriver` on each lab host) whose four servers are
booted on host 0: one writing above the link, one CPU-bound writer, one
web-like VM and one idle VM, 1.25 GiB of RAM in all.

- (a) Nova alone, defaults: every server live-migrated, the requests sent one
  after another as `nova host-evacuate-live` does, the scheduler picking the
  targets; `max_concurrent_live_migrations = 1` (Nova's default).
- (b) Nova alone, hardened: post-copy and auto-converge permitted,
  `live_migration_timeout_action = force_complete`.
- (c) hostmaint through Nova (`nova` driver), docs/nova.md's mode 1.
- (d) hostmaint with the `libvirt` driver (the agents migrate peer to peer),
  the same guests booted by the lab without disks: libvirt refuses to move a
  disk on a filesystem it does not know as shared, and only Nova's driver is
  told the lab's is (lab/nova_libvirt.py).

Per row: the makespan, each VM's real downtime (QEMU's completed job on its
new host; "n/a" where QEMU recorded none, as after a post-copy switch), aborts
and failures, post-copy switches. A row that passes
--cap-s is stopped (its running migrations aborted) and reported as
"> cap, N of M moved". Nova's delays and timeouts are never scaled.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from hostmaint.lab import cluster
from hostmaint.lab.demo import CoordinatorProcess, coordinator_config, free_port, last_downtime_ms
from hostmaint.lab.guest import GuestMode, GuestSpec
from hostmaint.lab.novalab import ACTIVE_MIGRATION, NovaLab, Server
from hostmaint.protos import coordinator_pb2 as cpb
from hostmaint.protos import coordinator_pb2_grpc

PREFIX = "hm-bnl"
GUESTS = [
    # name, RAM MiB, working set MiB, MiB/s, mode, static fill MiB
    GuestSpec(f"{PREFIX}-hot", 384, 96, 60, GuestMode.PACED, 64),  # above the link
    GuestSpec(f"{PREFIX}-cpu", 384, 64, 400, GuestMode.CPU, 64),  # as fast as its vCPU
    GuestSpec(f"{PREFIX}-web", 256, 32, 4, GuestMode.PACED, 128),
    GuestSpec(f"{PREFIX}-idle", 256, 8, 0.1, GuestMode.PACED, 64),
]
ROWS = {
    "a": ("Nova alone, defaults", "defaults"),
    "b": ("Nova alone, hardened", "hardened"),
    "c": ("hostmaint through Nova, mode 1", "mode1"),
    "d": ("hostmaint, libvirt driver", "mode1"),
}
POSTCOPY_SWITCH = "Switching to post-copy migration mode"


@dataclass
class Row:
    title: str
    makespan_s: float = 0.0
    capped: bool = False
    moved: int = 0
    downtime_ms: dict[str, float | None] = field(default_factory=dict)
    moved_vms: set[str] = field(default_factory=set)
    aborts: int = 0
    failures: int = 0
    postcopy: int = 0
    note: str = ""


def _nova_alone(nova: NovaLab, servers: list[Server], source: str, cap_s: float, row: Row) -> None:
    """As `nova host-evacuate-live`: one request per server, at once; Nova queues them."""
    t0 = time.monotonic()
    for s in servers:
        nova.action(s.id, {"os-migrateLive": {"host": None, "block_migration": "auto"}})
    while True:
        busy = [
            m
            for s in servers
            for m in nova.live_migrations(s.id)
            if m["status"] in ACTIVE_MIGRATION
        ]
        if not busy:
            break
        if time.monotonic() - t0 > cap_s:
            row.capped = True
            for m in busy:
                nova.http.delete(f"{nova.url}/servers/{m['instance_uuid']}/migrations/{m['id']}")
            break
        time.sleep(1.0)
    row.makespan_s = time.monotonic() - t0
    for s in servers:
        records = nova.live_migrations(s.id)
        row.aborts += sum(1 for m in records if m["status"] in ("cancelled", "error"))
        row.failures += sum(1 for m in records if m["status"] in ("failed", "error"))
    row.postcopy = len(nova.log_lines(POSTCOPY_SWITCH))


def _lab_guests(lab: cluster.Lab, work: Path, limit_ms: int, row: Row) -> None:
    """Row (d): the same guests as lab guests, without disks: libvirt refuses to move a
    disk on a filesystem it does not know as shared unless told the move is safe, which
    the agent never says; Nova's driver is told so (lab/nova_libvirt.py)."""
    source = lab.hosts[0].name
    for spec in GUESTS:
        lab.add_guest(spec, source, wait=False)
    lab.wait_guests_ready(900)
    _hostmaint(lab, "", work, limit_ms, row)
    for spec in GUESTS:
        name = spec.name.removeprefix(f"{PREFIX}-")
        where = [h.name for h in lab.running_on(spec.name)]
        moved = len(where) == 1 and where[0] != source
        row.moved += int(moved)
        if moved:
            row.moved_vms.add(name)
        row.downtime_ms[name] = last_downtime_ms(lab, spec.name) if moved else None


def _hostmaint(lab: cluster.Lab, nova_url: str, work: Path, limit_ms: int, row: Row) -> None:
    """A Drain through a coordinator: the `nova` driver over `nova_url`, else `libvirt`."""
    port = free_port()
    conf = work / "coordinator.conf"
    extra: dict[str, dict[str, str]] = {}
    if nova_url:
        nova_section = {"endpoint": nova_url, "noauth": "true", "timeout_s": "10"}
        extra = {"driver": {"name": "nova"}, "nova": nova_section}
    conf.write_text(
        coordinator_config(lab, work / "bench.db", port, max_downtime_ms=limit_ms, extra=extra)
    )
    coordinator = CoordinatorProcess(conf, port, work / "coordinator.log")
    coordinator.start()
    try:
        t0 = time.monotonic()
        with grpc.insecure_channel(coordinator.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            policy = cpb.DrainPolicy(max_downtime_ms=limit_ms, allow_postcopy=True)
            request = cpb.DrainRequest(host=lab.hosts[0].name, policy=policy, reason="bench")
            events = list(stub.Drain(request))
        row.makespan_s = time.monotonic() - t0
    finally:
        coordinator.stop()
    status = events[-1].status
    row.note = cpb.DrainState.Name(status.state).removeprefix("DRAIN_STATE_").lower()
    for vm in status.vms:
        row.aborts += sum(1 for t in vm.tuning_applied if t == "abort")
        row.failures += int(vm.state == cpb.VM_STATE_FAILED)
        row.postcopy += int("postcopy" in vm.tuning_applied)


def run_row(key: str, cap_s: float, limit_ms: int, base: Path, subnet: str) -> Row:
    title, profile = ROWS[key]
    row = Row(f"({key}) {title}")
    work = base / key
    work.mkdir(parents=True)
    config = cluster.LabConfig(prefix=f"hm-bn{key}", state_dir=work / "lab", subnet=subnet)
    lab, _ = cluster.Lab.up(3, [], config)
    try:
        if key == "d":
            _lab_guests(lab, work, limit_ms, row)
            return row
        extra = ("max_concurrent_live_migrations=1",) if key in ("a", "b") else ()
        nova = NovaLab.start(lab, work, GUESTS, profile=profile, extra_flags=extra)
        try:
            source = lab.hosts[0].name
            servers = [nova.boot(spec, source) for spec in GUESTS]
            nova.wait_ready(servers, 900)
            if key in ("a", "b"):
                _nova_alone(nova, servers, source, cap_s, row)
            else:
                _hostmaint(lab, nova.url, work, limit_ms, row)
            for s in servers:
                where = nova.where(s)
                moved = len(where) == 1 and where[0] != source
                name = s.name.removeprefix(f"{PREFIX}-")
                row.moved += int(moved)
                if moved:
                    row.moved_vms.add(name)
                row.downtime_ms[name] = nova.downtime_ms(s) if moved else None
        finally:
            nova.stop()
    finally:
        lab.down()
    return row


def table(rows: list[Row], cap_s: float) -> str:
    names = [g.name.removeprefix(f"{PREFIX}-") for g in GUESTS]
    head = [
        "row",
        "makespan",
        *(f"{n} downtime ms" for n in names),
        "aborts",
        "failed",
        "post-copy",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        span = (
            f"> {cap_s / 60:.0f} min, {r.moved} of {len(GUESTS)} moved"
            if r.capped
            else f"{r.makespan_s:.1f} s ({r.moved} of {len(GUESTS)} moved)"
        )
        downtimes = [
            "not moved"
            if n not in r.moved_vms
            else "n/a"
            if r.downtime_ms.get(n) is None
            else f"{r.downtime_ms[n]:.0f}"
            for n in names
        ]
        cells = [r.title, span, *downtimes, str(r.aborts), str(r.failures), str(r.postcopy)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="a,b,c,d", help="which rows, e.g. c,d")
    parser.add_argument("--cap-s", type=float, default=1800.0, help="stop a row after this")
    parser.add_argument("--limit-ms", type=int, default=500, help="hostmaint's downtime limit")
    parser.add_argument(
        "--subnet",
        default="10.213.31.0/24",
        help="the lab's subnet (one bench at a time per subnet)",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the lab needs root", file=sys.stderr)
        return 2
    keys = [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {sorted(ROWS)}")
    base = Path(tempfile.mkdtemp(prefix="bench-nova-lab-"))
    print(f"work: {base}; guests: {[(g.name, g.memory_mib) for g in GUESTS]}", flush=True)
    rows = []
    for key in keys:
        t0 = time.monotonic()
        rows.append(run_row(key, args.cap_s, args.limit_ms, base, args.subnet))
        print(f"row {key} done in {time.monotonic() - t0:.0f} s", flush=True)
        print(table(rows, args.cap_s), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
