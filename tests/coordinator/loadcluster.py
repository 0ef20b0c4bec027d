"""Many hosts drained at once: real agents on test:/// hosts, a real coordinator, a simulated cloud.

The agents (in-process gRPC servers over libvirt's test:/// driver) supply what
the coordinator reads from hosts: health, host reports, domains. The cloud is
`SimDriver`, whose migrations complete after the model's predicted time scaled
down. The coordinator is assembled from its real parts (journal, agent
registry, executor, gRPC servicer) around that driver, and drains are started
and followed through its gRPC API, one Drain stream per host.

Shared by tests/coordinator/test_load.py and tools/bench_coordinator_load.py.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy.engine import Engine

from hostmaint.agent.cmd import Agent
from hostmaint.common import daemon
from hostmaint.coordinator.agents import AgentRegistry, ignore_call_failure
from hostmaint.coordinator.cmd import SERVICE_NAME
from hostmaint.coordinator.drivers.base import Instance, InstanceState
from hostmaint.coordinator.executor import Executor, ExecutorSettings
from hostmaint.coordinator.journal import STEP_DONE, Journal, make_engine
from hostmaint.coordinator.metrics import CoordinatorMetrics
from hostmaint.coordinator.model import DrainPolicy, Link
from hostmaint.coordinator.servicer import CoordinatorServicer
from hostmaint.protos import coordinator_pb2 as cpb
from hostmaint.protos import coordinator_pb2_grpc
from tests.agent.nodexml import NovaMeta, TestDomain, rbd_disk, write_node
from tests.coordinator.conftest import start_agent
from tests.coordinator.simdriver import Move, SimDriver, SimHost

LINK_BYTES_PER_S = 1.25e9  # 10 Gbit/s


def source_name(i: int) -> str:
    return f"src{i:03d}"


def target_name(i: int) -> str:
    return f"dst{i:03d}"


def host_domains(host_index: int, count: int) -> list[TestDomain]:
    """`count` running Nova instances of 512 MiB to 4 GiB, unique across hosts."""
    out = []
    for i in range(count):
        n = host_index * 100_000 + i
        out.append(
            TestDomain(
                name=f"instance-{n:08x}",
                uuid=f"{host_index:08x}-0000-4000-8000-{i:012x}",
                memory_mib=512 * (1 + n % 8),
                vcpus=1 + n % 4,
                nova=NovaMeta(f"vm-{host_index}-{i}", f"m1.f{n % 8}", "p" * 8, "u" * 8),
                disks=(rbd_disk("vda", f"vms/{n}_disk"),),
            )
        )
    return out


def instance(d: TestDomain, host: str) -> Instance:
    assert d.nova is not None
    return Instance(
        uuid=d.uuid,
        name=d.nova.name,
        host=host,
        project_id=d.nova.project_uuid,
        state=InstanceState.ACTIVE,
        task_state=None,
        flavor_name=d.nova.flavor,
        vcpus=d.vcpus,
        memory_mb=d.memory_mib,
    )


@dataclass(frozen=True)
class Layout:
    """Sources full of VMs, empty targets sized to take them all."""

    sources: dict[str, list[TestDomain]]
    targets: list[str]
    target_memory_mb: int
    target_vcpus: int

    @classmethod
    def build(cls, n_sources: int, vms_per_source: int, n_targets: int) -> Layout:
        sources = {source_name(i): host_domains(i + 1, vms_per_source) for i in range(n_sources)}
        total_mb = sum(d.memory_mib for ds in sources.values() for d in ds)
        total_vcpus = sum(d.vcpus for ds in sources.values() for d in ds)
        # Twice the even share: the drains plan independently and may favour some targets.
        return cls(
            sources,
            [target_name(i) for i in range(n_targets)],
            target_memory_mb=2 * total_mb // n_targets + 65536,
            target_vcpus=2 * total_vcpus // n_targets + 64,
        )

    def sim_hosts(self) -> list[SimHost]:
        # Sources are as big as targets; the drains' policy never sends VMs to them.
        return [
            SimHost(h, self.target_memory_mb, self.target_vcpus)
            for h in [*self.sources, *self.targets]
        ]

    def instances(self) -> list[Instance]:
        return [instance(d, host) for host, ds in self.sources.items() for d in ds]

    @property
    def vm_count(self) -> int:
        return sum(len(ds) for ds in self.sources.values())


def start_agents(workdir: Path, layout: Layout) -> dict[str, Agent]:
    agents: dict[str, Agent] = {}
    try:
        for host, domains in layout.sources.items():
            agents[host] = start_agent(write_node(workdir / f"{host}.xml", domains))
        for host in layout.targets:
            agents[host] = start_agent(write_node(workdir / f"{host}.xml", []))
    except BaseException:
        for a in agents.values():
            a.stop()
        raise
    return agents


_TIMED = (
    "create_drain",
    "drain",
    "latest_drain",
    "update_drain",
    "finish_drain",
    "save_plan",
    "vms",
    "vm",
    "update_vm",
    "begin_step",
    "end_step",
    "steps",
    "disable_host",
    "disabled_reason",
)


class TimedJournal(Journal):
    """The journal, counting its calls and the thread CPU time of the outermost ones."""

    def __init__(self, engine: Engine, clock: Callable[[], float]) -> None:
        super().__init__(engine, clock)
        self.calls: Counter[str] = Counter()
        self.cpu_s: defaultdict[str, float] = defaultdict(float)
        self._depth = threading.local()
        self._count_lock = threading.Lock()

    def _timed(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        depth = getattr(self._depth, "n", 0)
        self._depth.n = depth + 1
        t0 = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            self._depth.n = depth
            spent = time.thread_time() - t0
            with self._count_lock:
                self.calls[name] += 1
                if depth == 0:
                    self.cpu_s[name] += spent


def _timed_method(name: str) -> Callable[..., Any]:
    plain = getattr(Journal, name)

    def method(self: TimedJournal, *args: Any, **kwargs: Any) -> Any:
        return self._timed(name, plain, self, *args, **kwargs)

    method.__name__ = name
    return method


for _name in _TIMED:
    setattr(TimedJournal, _name, _timed_method(_name))


@dataclass(frozen=True)
class CoordinatorSpec:
    """Everything a simulated coordinator needs; picklable, to build it in a child process."""

    db_url: str
    agent_addresses: dict[str, str]
    hosts: list[SimHost]
    instances: list[Instance]
    time_scale: float = 0.01
    poll_interval_s: float = 0.1
    max_parallel_per_source: int = 4
    max_parallel_per_target: int = 2
    metrics_listen: str = ""  # host:port of a Prometheus endpoint, as [metrics] listen


class SimCoordinator:
    """The coordinator's parts wired as cmd.Coordinator wires them, around a SimDriver."""

    def __init__(self, spec: CoordinatorSpec) -> None:
        self.stopped = threading.Event()
        self.spec = spec
        self.metrics = CoordinatorMetrics() if spec.metrics_listen else None
        self.journal = TimedJournal(make_engine(spec.db_url), clock=time.time)
        self.registry = AgentRegistry(
            spec.agent_addresses,
            timeout_s=10.0,
            tls=None,
            clock=time.time,
            on_call_failed=(
                self.metrics.agent_call_failed if self.metrics else ignore_call_failure
            ),
        )
        self.driver = SimDriver(
            spec.hosts,
            spec.instances,
            clock=time.monotonic,
            link=Link(LINK_BYTES_PER_S),
            time_scale=spec.time_scale,
        )
        self.executor = Executor(
            self.driver,
            self.registry,
            self.journal,
            ExecutorSettings(
                defaults=DrainPolicy(
                    max_parallel_per_source=spec.max_parallel_per_source,
                    max_parallel_per_target=spec.max_parallel_per_target,
                ),
                link_bandwidth_bytes_per_s=LINK_BYTES_PER_S,
                poll_interval_s=spec.poll_interval_s,
                dirty_rate_window_s=1,
                watch_start_timeout_s=0.5,
            ),
            clock=time.time,
            stopped=self.stopped,
        )
        servicer = CoordinatorServicer(self.executor, self.registry)
        self.server = daemon.build_server(
            "127.0.0.1:0",
            lambda s: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, s),
            [SERVICE_NAME],
            tls=daemon.TlsFiles("", "", ""),
            insecure=False,
            max_workers=64,
            interceptors=[self.metrics.rpcs] if self.metrics else [],
        )

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> None:
        self.server.server.start()
        self.server.set_serving(True)
        if self.metrics is not None:
            self.metrics.start(
                self.spec.metrics_listen,
                self.executor,
                self.journal,
                self.registry,
                clock=time.time,
                stopped=self.stopped,
                interval_s=self.spec.poll_interval_s,
            )

    def stop(self) -> None:
        self.stopped.set()
        self.server.stop(0.5)
        if self.metrics is not None:
            self.metrics.stop()
        self.registry.close()


@contextmanager
def simulated(workdir: Path, layout: Layout, **spec: Any) -> Iterator[SimCoordinator]:
    """Agents on test:/// hosts for `layout`, and a SimCoordinator over them, started;
    `spec` sets CoordinatorSpec's other fields."""
    agents = start_agents(workdir, layout)
    coordinator = SimCoordinator(
        CoordinatorSpec(
            db_url=f"sqlite:///{workdir / 'coordinator.db'}",
            agent_addresses=addresses(agents),
            hosts=layout.sim_hosts(),
            instances=layout.instances(),
            **spec,
        )
    )
    coordinator.start()
    try:
        yield coordinator
    finally:
        coordinator.stop()
        for a in agents.values():
            a.stop()


@dataclass(frozen=True)
class SimReport:
    placement: dict[str, str]
    moves: list[Move]
    migrations_started: int
    journal_calls: dict[str, int] = field(default_factory=dict)
    journal_cpu_s: dict[str, float] = field(default_factory=dict)


def serve_in_child(spec: CoordinatorSpec, conn: Connection) -> None:
    """A child process's body: serve, send the port, answer `report`, stop on `stop`."""
    coordinator = SimCoordinator(spec)
    coordinator.start()
    conn.send(coordinator.port)
    try:
        while True:
            command = conn.recv()
            if command == "report":
                d, j = coordinator.driver, coordinator.journal
                conn.send(
                    SimReport(
                        d.placement(),
                        d.moves(),
                        d.migrations_started,
                        dict(j.calls),
                        dict(j.cpu_s),
                    )
                )
            else:
                break
    finally:
        coordinator.stop()
        conn.close()


@dataclass
class DrainResult:
    host: str
    drain_id: str = ""
    events: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    final: cpb.DrainStatus | None = None
    error: str = ""
    elapsed_s: float = 0.0


def follow_drain(
    stub: coordinator_pb2_grpc.CoordinatorStub, host: str, policy: cpb.DrainPolicy, timeout_s: float
) -> DrainResult:
    result = DrainResult(host)
    t0 = time.perf_counter()
    try:
        request = cpb.DrainRequest(host=host, policy=policy, reason="load")
        for event in stub.Drain(request, timeout=timeout_s):
            result.events += 1
            result.drain_id = result.drain_id or event.drain_id
            result.kinds[cpb.DrainEventKind.Name(event.kind)] += 1
            if event.kind == cpb.DRAIN_EVENT_KIND_FINISHED:
                result.final = event.status
    except grpc.RpcError as e:
        result.error = f"{e.code().name}: {e.details()}"
    result.elapsed_s = time.perf_counter() - t0
    return result


def drain_all(
    address: str, hosts: Sequence[str], policy: cpb.DrainPolicy, timeout_s: float
) -> list[DrainResult]:
    """One Drain stream per host, all at once, each on its own thread over one channel."""
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        with ThreadPoolExecutor(len(hosts), thread_name_prefix="drain-client") as pool:
            return list(pool.map(lambda h: follow_drain(stub, h, policy, timeout_s), hosts))


def verify(
    layout: Layout, results: Sequence[DrainResult], journal: Journal, sim: SimReport
) -> list[str]:
    """Every way the drains could have gone wrong, as sentences; empty when all is well."""
    problems: list[str] = []
    targets = set(layout.targets)
    for r in results:
        if r.error or r.final is None:
            problems.append(f"{r.host}: stream ended without FINISHED ({r.error})")
            continue
        if r.final.state != cpb.DRAIN_STATE_COMPLETED:
            problems.append(f"{r.host}: {cpb.DrainState.Name(r.final.state)}")
        expected = {d.uuid for d in layout.sources[r.host]}
        got = {v.vm_uuid for v in r.final.vms if v.state == cpb.VM_STATE_COMPLETED}
        if got != expected:
            problems.append(f"{r.host}: {len(expected - got)} VMs not reported completed")
        drain = journal.drain(r.drain_id)
        if drain.state != "completed":
            problems.append(f"{r.host}: journal says {drain.state}")
        if journal.lock_holder(r.host) is not None:
            problems.append(f"{r.host}: host lock still held")
        steps = journal.steps(r.drain_id)
        open_steps = [s for s in steps if s.state != STEP_DONE]
        if open_steps:
            problems.append(f"{r.host}: {len(open_steps)} steps not done")
        done = Counter((s.action, s.vm_uuid) for s in steps if s.state == STEP_DONE)
        twice = [k for k, n in done.items() if n > 1]
        if twice:
            problems.append(f"{r.host}: steps done twice: {twice[:3]}")
        starts = {vm for (action, vm), _ in done.items() if action == "start_migration"}
        if starts != expected:
            problems.append(f"{r.host}: start steps for {len(starts)} of {len(expected)} VMs")
        if done[("disable_host", "")] != 1:
            problems.append(f"{r.host}: disable_host done {done[('disable_host', '')]} times")
        for row in journal.vms(r.drain_id):
            where = sim.placement.get(row.vm_uuid)
            if row.state != "completed" or row.attempts != 1 or row.target_host != where:
                problems.append(
                    f"{r.host}: vm {row.vm_uuid} {row.state} attempts={row.attempts} "
                    f"target={row.target_host} placed={where}"
                )
    all_vms = {d.uuid for ds in layout.sources.values() for d in ds}
    if set(sim.placement) != all_vms:
        problems.append("the cloud lost or gained VMs")
    misplaced = [u for u, h in sim.placement.items() if h not in targets]
    if misplaced:
        problems.append(f"{len(misplaced)} VMs not on a target host")
    moved = Counter(m.instance_uuid for m in sim.moves)
    if set(moved) != all_vms or any(n != 1 for n in moved.values()):
        problems.append(
            f"moves: {len(moved)} VMs moved, {sum(1 for n in moved.values() if n > 1)} twice"
        )
    if sim.migrations_started != len(all_vms):
        problems.append(f"{sim.migrations_started} migrations started for {len(all_vms)} VMs")
    return problems


def drain_policy(targets: Sequence[str]) -> cpb.DrainPolicy:
    """Drains that send VMs only to the spare targets, never to each other's sources."""
    return cpb.DrainPolicy(target_hosts=list(targets))


def addresses(agents: Mapping[str, Agent]) -> dict[str, str]:
    return {h: f"127.0.0.1:{a.port}" for h, a in agents.items()}
