"""Benchmark: many hosts drained at once through one coordinator's gRPC API.

    python tools/bench_coordinator_load.py --sources 20 --vms 40 --targets 10

The coordinator (its real journal, executor and servicer) runs in a child
process around a simulated cloud (tests/coordinator/simdriver.py): a
migration completes after the convergence model's predicted time for that VM
times --time-scale, and moves the VM in the cloud's table. The agents are real
gRPC agents on libvirt test:/// hosts, in this process; so are the Drain
stream clients, one per source host, all started at once. Each source host's
VMs go only to the spare target hosts.

Prints wall time, drains/s, migrations/s, events streamed, the coordinator
process's CPU seconds and peak RSS; then checks that every drain COMPLETED,
every VM is on exactly one target after exactly one migration, and the
journal holds each step once (exit status 1 otherwise).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hostmaint.coordinator.journal import Journal, make_engine
from hostmaint.protos import coordinator_pb2 as cpb
from tests.coordinator.loadcluster import (
    CoordinatorSpec,
    Layout,
    SimReport,
    addresses,
    drain_all,
    drain_policy,
    serve_in_child,
    start_agents,
    verify,
)
from tools.procstats import PeakSampler, percentile


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=20, help="hosts drained at once")
    parser.add_argument("--vms", type=int, default=40, help="VMs per source host")
    parser.add_argument("--targets", type=int, default=10, help="spare hosts receiving them")
    parser.add_argument("--time-scale", type=float, default=0.01)
    parser.add_argument("--poll-interval", type=float, default=0.1)
    parser.add_argument("--parallel-per-source", type=int, default=4)
    parser.add_argument("--parallel-per-target", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    tmp = Path(tempfile.mkdtemp(prefix="hm-load-coord-"))
    layout = Layout.build(args.sources, args.vms, args.targets)
    db_url = f"sqlite:///{tmp / 'coordinator.db'}"
    agents = start_agents(tmp, layout)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    spec = CoordinatorSpec(
        db_url=db_url,
        agent_addresses=addresses(agents),
        hosts=layout.sim_hosts(),
        instances=layout.instances(),
        time_scale=args.time_scale,
        poll_interval_s=args.poll_interval,
        max_parallel_per_source=args.parallel_per_source,
        max_parallel_per_target=args.parallel_per_target,
    )
    proc = ctx.Process(target=serve_in_child, args=(spec, child), name="hm-load-coordinator")
    proc.start()
    try:
        if not parent.poll(120):
            raise SystemExit("the coordinator did not start")
        port = parent.recv()
        assert proc.pid is not None
        with PeakSampler(proc.pid) as sampler:
            cpu0 = sampler.cpu_s()
            t0 = time.perf_counter()
            results = drain_all(
                f"127.0.0.1:{port}",
                list(layout.sources),
                drain_policy(layout.targets),
                args.timeout,
            )
            wall = time.perf_counter() - t0
            cpu1 = sampler.cpu_s()
        parent.send("report")
        report: SimReport = parent.recv()
        parent.send("stop")
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join(10)
        for a in agents.values():
            a.stop()
    journal = Journal(make_engine(db_url), clock=time.time)
    problems = verify(layout, results, journal, report)
    completed = sum(
        1 for r in results if r.final is not None and r.final.state == cpb.DRAIN_STATE_COMPLETED
    )
    events = sum(r.events for r in results)
    progress = sum(r.kinds["DRAIN_EVENT_KIND_PROGRESS"] for r in results)
    per_drain = [r.elapsed_s for r in results]
    sim_s = [m.ended_s - m.started_s for m in report.moves]
    print(
        f"coordinator load: {args.sources} hosts x {args.vms} VMs drained at once to "
        f"{args.targets} targets (time scale {args.time_scale}, poll {args.poll_interval} s, "
        f"{args.parallel_per_source}/source)"
    )
    print(
        f"  wall {wall:.2f} s  drains/s {len(results) / wall:.2f}  "
        f"migrations/s {len(report.moves) / wall:.1f}  completed drains {completed}/{len(results)}"
    )
    print(
        f"  per drain p50 {percentile(per_drain, 50):.2f} s  max {max(per_drain):.2f} s; "
        f"simulated migration p50 {percentile(sim_s, 50) * 1000:.0f} ms "
        f"(sum {sum(sim_s):.1f} s, mean {statistics.mean(sim_s) * 1000:.0f} ms)"
        if sim_s
        else "  no migrations"
    )
    print(f"  events streamed {events} ({events / wall:.0f}/s, {progress} progress)")
    print(
        f"  coordinator process CPU {cpu1 - cpu0:.2f} s over the drains "
        f"({cpu1:.2f} s since start), peak RSS {sampler.peak_rss / 2**20:.0f} MiB"
    )
    steps = sum(len(journal.steps(r.drain_id)) for r in results if r.drain_id)
    jcpu = sum(report.journal_cpu_s.values())
    top = sorted(report.journal_cpu_s.items(), key=lambda kv: -kv[1])[:4]
    print(
        f"  journal: {sum(report.journal_calls.values())} calls, {jcpu:.2f} s CPU in them "
        f"({jcpu / max(cpu1, 1e-9):.0%} of the coordinator's), {steps} steps; top "
        + ", ".join(f"{k} {v:.1f} s/{report.journal_calls.get(k, 0)}" for k, v in top)
    )
    if problems:
        print(f"PROBLEMS ({len(problems)}):")
        for p in problems[:20]:
            print(f"  {p}")
        return 1
    print("  checks: every drain COMPLETED, every VM on one target after one migration, ")
    print("          no step done twice or left open")
    return 0


if __name__ == "__main__":
    sys.exit(main())
