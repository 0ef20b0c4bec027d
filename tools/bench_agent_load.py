"""Benchmark: a real hostmaint-agent daemon under many client processes.

    python tools/bench_agent_load.py --domains 200 --clients 50 --calls 40

Starts `hostmaint-agent` as a child process on a libvirt test:/// host of
--domains domains, then --clients client processes (each its own gRPC
channel) that call ListDomains and the gRPC health Check --calls times each,
all started together. Prints p50/p99 latency per RPC, throughput, errors, and
the agent process's CPU seconds and peak RSS (psutil on its pid, plus the
kernel's high-water mark). Exit status 1 on any error or short answer.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.agent.loadgen import agent_daemon, run_clients
from tests.agent.nodexml import many_domains, write_node
from tools.procstats import PeakSampler, percentile


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=200)
    parser.add_argument("--clients", type=int, default=50, help="client processes")
    parser.add_argument("--calls", type=int, default=40, help="calls of each RPC per client")
    parser.add_argument(
        "--max-workers", type=int, default=32, help="the agent's [grpc] max_workers"
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hm-load-agent-"))
    node = write_node(tmp / "node.xml", many_domains(args.domains), memory_kib=2**40 // 1024)
    with agent_daemon(node, tmp, max_workers=args.max_workers) as agent:
        with PeakSampler(agent.pid) as sampler:
            idle_rss = sampler.process.memory_info().rss
            cpu0 = sampler.cpu_s()
            load = run_clients(agent.address, args.clients, args.calls)
            cpu1 = sampler.cpu_s()
    r = load.merged
    ms = 1000.0
    calls = len(r.list_s) + len(r.health_s)
    short = sum(n for count, n in r.domain_counts.items() if count != args.domains)
    print(
        f"agent daemon under load: {args.domains} domains, {args.clients} client processes x "
        f"{args.calls} calls of each RPC, max_workers {args.max_workers}"
    )
    print(
        f"  ListDomains p50 {percentile(r.list_s, 50) * ms:.1f} ms  p99 {percentile(r.list_s, 99) * ms:.1f} ms"
        f"  max {max(r.list_s, default=0) * ms:.1f} ms  ({len(r.list_s)} answers)"
    )
    print(
        f"  Health.Check p50 {percentile(r.health_s, 50) * ms:.2f} ms  "
        f"p99 {percentile(r.health_s, 99) * ms:.2f} ms  max {max(r.health_s, default=0) * ms:.1f} ms"
    )
    print(
        f"  throughput {len(r.list_s) / load.wall_s:.1f} ListDomains/s, "
        f"{calls / load.wall_s:.1f} calls/s over {load.wall_s:.2f} s wall"
    )
    print(
        f"  errors {sum(r.errors.values())} {dict(r.errors) or ''}  answers short of "
        f"{args.domains} domains: {short}  health {dict(r.health)}"
    )
    print(
        f"  agent process CPU {cpu1 - cpu0:.2f} s under load ({cpu1:.2f} s since start), "
        f"RSS idle {idle_rss / 2**20:.0f} MiB, peak {sampler.peak_rss / 2**20:.0f} MiB"
    )
    return 1 if r.errors or short else 0


if __name__ == "__main__":
    sys.exit(main())
