"""Benchmark: ListDomains and health of a real agent over a test:/// host of N domains.

    python tools/bench_agent.py --domains 200 --calls 50 --clients 1
    python tools/bench_agent.py --domains 200 --calls 20 --clients 50

Prints latency percentiles, calls per second and the agent process's CPU
time and RSS; the baseline is the same host read with a bare libvirt loop
(listAllDomains + XMLDesc + state per domain), measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hostmaint.agent.cmd import Agent, load_config
from hostmaint.protos import agent_pb2 as pb
from hostmaint.protos import agent_pb2_grpc
from tests.agent.nodexml import many_domains, write_node
from tools.procstats import percentile


def bare_libvirt(uri: str, calls: int) -> list[float]:
    import libvirt  # noqa: TID251  (the baseline reads libvirt directly)

    conn = libvirt.open(uri)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        for dom in conn.listAllDomains(0):
            dom.XMLDesc(0)
            dom.state(0)
        times.append(time.perf_counter() - t0)
    conn.close()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=200)
    parser.add_argument("--calls", type=int, default=50, help="calls per client")
    parser.add_argument("--clients", type=int, default=1)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hm-bench-"))
    node = write_node(tmp / "node.xml", many_domains(args.domains), memory_kib=2**40 // 1024)
    conf = load_config([])
    conf.set_override("uri", f"test://{node}", group="libvirt")
    conf.set_override("listen", "127.0.0.1:0", group="grpc")
    conf.set_override("enabled", False, group="dirty_rate")
    conf.set_override("max_workers", max(8, args.clients), group="grpc")
    agent = Agent(conf, threading.Event())
    agent.driver.connect()
    agent.start()
    me = psutil.Process()
    cpu0 = me.cpu_times()
    errors = 0
    lat: list[float] = []
    health_lat: list[float] = []
    lock = threading.Lock()

    def client() -> None:
        nonlocal errors
        with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as ch:
            stub = agent_pb2_grpc.HostAgentStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            for _ in range(args.calls):
                try:
                    t0 = time.perf_counter()
                    n = len(stub.ListDomains(pb.ListDomainsRequest(), timeout=60).domains)
                    t1 = time.perf_counter()
                    health.Check(health_pb2.HealthCheckRequest(), timeout=60)
                    t2 = time.perf_counter()
                    assert n == args.domains
                    with lock:
                        lat.append(t1 - t0)
                        health_lat.append(t2 - t1)
                except (grpc.RpcError, AssertionError):
                    with lock:
                        errors += 1

    t_start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        for f in [pool.submit(client) for _ in range(args.clients)]:
            f.result()
    wall = time.perf_counter() - t_start
    cpu1 = me.cpu_times()
    rss = me.memory_info().rss
    agent.stop()
    base = bare_libvirt(f"test://{node}", max(5, args.calls // 2))
    ms = 1000.0
    print(f"agent ListDomains, {args.domains} domains, {args.clients} clients x {args.calls} calls")
    print(
        f"  p50 {percentile(lat, 50) * ms:.1f} ms  p99 {percentile(lat, 99) * ms:.1f} ms  "
        f"mean {statistics.mean(lat) * ms:.1f} ms  errors {errors}"
    )
    print(
        f"  health p50 {percentile(health_lat, 50) * ms:.2f} ms  p99 {percentile(health_lat, 99) * ms:.2f} ms"
    )
    print(f"  throughput {len(lat) / wall:.1f} ListDomains/s")
    print(
        f"  process CPU {(cpu1.user + cpu1.system - cpu0.user - cpu0.system):.2f} s over "
        f"{wall:.2f} s wall, RSS {rss / 2**20:.0f} MiB (agent and clients in one process)"
    )
    print(
        f"baseline: bare libvirt loop p50 {percentile(base, 50) * ms:.1f} ms; "
        f"agent/baseline {percentile(lat, 50) / percentile(base, 50):.2f}x"
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
