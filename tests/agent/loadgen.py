"""Load on a real hostmaint-agent daemon: the daemon in a child process, clients in processes.

`agent_daemon` starts `hostmaint-agent` on a test:/// node file, waits for its
READY=1 (sd_notify on a socket of ours) and yields its pid and address.
`run_clients` starts N client processes, each with its own gRPC channel; all
wait on one start event, then call ListDomains and the health Check `calls`
times each and send back their latencies, the domain count of every answer
and their errors. Shared by tests/agent/test_load.py and
tools/bench_agent_load.py.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path

from tests.ports import free_port

AGENT_SERVICE = "hostmaint.v1.HostAgent"


@dataclass
class Daemon:
    pid: int
    address: str
    log: Path
    returncode: int | None = None  # set once it has stopped


@contextmanager
def agent_daemon(node: Path, workdir: Path, max_workers: int = 32) -> Iterator[Daemon]:
    """A `hostmaint-agent` child on `node`; stopped with SIGTERM (then killed) on exit."""
    port = free_port()
    conf = workdir / "agent.conf"
    conf.write_text(
        f"[libvirt]\nuri = test://{node}\n"
        f"[grpc]\nlisten = 127.0.0.1:{port}\ngrace_s = 1\nmax_workers = {max_workers}\n"
        "[dirty_rate]\nenabled = false\n"
    )
    notify_path = workdir / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(60)
    log = workdir / "agent.log"
    binary = Path(sys.executable).parent / "hostmaint-agent"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(binary), "--config-file", str(conf)],
            env=dict(os.environ, NOTIFY_SOCKET=str(notify_path)),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    daemon = Daemon(proc.pid, f"127.0.0.1:{port}", log)
    try:
        ready = notify.recv(4096).decode()
        if "READY=1" not in ready:
            raise RuntimeError(f"the agent said {ready!r} instead of READY=1")
        yield daemon
    finally:
        # The notify socket stays open until the agent is gone: it sends STOPPING=1 on its way.
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        daemon.returncode = proc.returncode
        notify.close()


@dataclass
class ClientResult:
    list_s: list[float] = field(default_factory=list)
    health_s: list[float] = field(default_factory=list)
    domain_counts: Counter[int] = field(default_factory=Counter)
    health: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)


def _client(
    address: str, calls: int, ready: Barrier, start: Event, results: Queue[ClientResult]
) -> None:
    """One client process: its own channel, `calls` ListDomains and health Checks."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from hostmaint.protos import agent_pb2 as pb
    from hostmaint.protos import agent_pb2_grpc

    result = ClientResult()
    with grpc.insecure_channel(address) as channel:
        stub = agent_pb2_grpc.HostAgentStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        try:
            grpc.channel_ready_future(channel).result(timeout=60)
        except grpc.FutureTimeoutError:
            result.errors["channel not ready"] += 1
        ready.wait()
        start.wait()
        for _ in range(calls):
            t0 = time.perf_counter()
            try:
                n = len(stub.ListDomains(pb.ListDomainsRequest(), timeout=60).domains)
                result.list_s.append(time.perf_counter() - t0)
                result.domain_counts[n] += 1
            except grpc.RpcError as e:
                result.errors[f"ListDomains {e.code().name}"] += 1
            t0 = time.perf_counter()
            try:
                answer = health.Check(
                    health_pb2.HealthCheckRequest(service=AGENT_SERVICE), timeout=60
                )
                result.health_s.append(time.perf_counter() - t0)
                result.health[health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)] += 1
            except grpc.RpcError as e:
                result.errors[f"Check {e.code().name}"] += 1
    results.put(result)


@dataclass
class LoadResult:
    clients: int
    calls: int
    wall_s: float
    merged: ClientResult


def run_clients(address: str, clients: int, calls: int) -> LoadResult:
    """`clients` processes at once; the wall time runs from the start signal to the last answer."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(clients + 1)
    start = ctx.Event()
    results: Queue[ClientResult] = ctx.Queue()
    procs = [
        ctx.Process(
            target=_client,
            args=(address, calls, ready, start, results),
            name=f"hm-load-client-{i}",
            daemon=True,
        )
        for i in range(clients)
    ]
    for p in procs:
        p.start()
    merged = ClientResult()
    try:
        ready.wait(timeout=300)
        t0 = time.perf_counter()
        start.set()
        for _ in procs:
            r = results.get(timeout=600)
            merged.list_s += r.list_s
            merged.health_s += r.health_s
            merged.domain_counts.update(r.domain_counts)
            merged.health.update(r.health)
            merged.errors.update(r.errors)
        wall = time.perf_counter() - t0
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.terminate()
                p.join()
    return LoadResult(clients, calls, wall, merged)
