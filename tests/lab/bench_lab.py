"""Figures for the lab: `up` of 3 hosts + 6 guests, `down`, and link sharing.

Run as root: python tests/lab/bench_lab.py [--state-dir D] [--subnet S]
Prints: time to start the hosts and boot the guests, time until every guest
reported ready, time for `down`; one migration alone and two at once out of
the same host, with the throughput on that host's shaped link.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import libvirt

from hostmaint.lab import cluster

SPEC = Path(__file__).with_name("six_guests.toml")


def _migrate(lab: cluster.Lab, guest: str, dst: cluster.LabHost, out: dict[str, str]) -> None:
    src = lab.where(guest)
    conn = libvirt.open(src.uri)
    try:
        started = time.monotonic()
        conn.lookupByName(guest).migrateToURI3(
            dst.uri,
            {libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{dst.migration_address}"},
            libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER,
        )
        elapsed_s = time.monotonic() - started
    finally:
        conn.close()
    dconn = libvirt.open(dst.uri)
    try:
        stats = dconn.lookupByName(guest).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    finally:
        dconn.close()
    out[guest] = (
        f"{guest} {elapsed_s:.1f}s at {stats.get('memory_bps', 0) * 8 / 1e6:.0f} Mbit/s "
        f"(QEMU), downtime {stats.get('downtime')} ms"
    )


def _measure(
    lab: cluster.Lab, src: cluster.LabHost, moves: list[tuple[str, cluster.LabHost]]
) -> str:
    results: dict[str, str] = {}
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.monotonic(), lab.link_bytes(src)[1]))
            done.wait(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=_migrate, args=(lab, g, d, results)) for g, d in moves]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    sampler.join()
    tx = samples[-1][1] - samples[0][1]
    peak = max(
        (
            (b1 - b0) * 8 / (t1 - t0)
            for i, (t0, b0) in enumerate(samples)
            for (t1, b1) in samples[i + 1 :]
            if 1.0 <= t1 - t0 < 1.15
        ),
        default=0.0,
    )
    return (
        f"{len(moves)} migration(s) at once out of {src.name}: {tx / 2**20:.0f} MiB sent, "
        f"peak {peak / 1e6:.0f} Mbit/s over 1 s on its {lab.rate_mbit} Mbit/s link; "
        + "; ".join(results.get(g, f"{g} failed") for g, _ in moves)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state-dir", type=Path, default=Path("/var/lib/hm-labb"))
    parser.add_argument("--subnet", default="10.213.3.0/24")
    args = parser.parse_args()
    config = cluster.LabConfig(
        prefix="hm-labb", state_dir=args.state_dir, subnet=args.subnet, wait_guests=False
    )
    plans = cluster.load_guest_plans(SPEC)
    t0 = time.monotonic()
    lab, report = cluster.Lab.up(3, plans, config)
    started_s = time.monotonic() - t0
    lab.wait_guests_ready(timeout_s=600)
    ready_s = time.monotonic() - t0
    print(f"accel={report.accel} cpu={report.cpu_model or '(qemu default)'}")
    print(f"up 3 hosts + 6 guests: started in {started_s:.1f}s, all guests ready in {ready_s:.1f}s")
    print(f"  phases: {dict(report.phases_s)}; agent failures: {len(report.agent_failures)}")
    try:
        h0, h1, h2 = lab.hosts
        print(_measure(lab, h2, [("vm-c", h0)]))
        print(_measure(lab, h0, [("vm-a", h1), ("vm-d", h2)]))
        for g in lab.guest_names:
            lab.where(g)  # every guest runs exactly once
    finally:
        t1 = time.monotonic()
        lab.down()
        print(f"down: {time.monotonic() - t1:.1f}s")


if __name__ == "__main__":
    main()
