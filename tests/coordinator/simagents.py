"""The agents of a simulated cloud (`SimDriver`), in process, behind the registry the
executor uses: what the coordinator reads from hosts, and the watch and tuning of
the migrations the cloud runs.

Each guest reports its memory and a writer: a rate, and the set it rewrites (a
window longer than the set takes to write reads as set / window, as libvirt's
unique-page count does). A migration's progress reports QEMU's round as the test
sets it (`set_round`): the test decides when the first pass is done and when the
rounds a plan gives pre-copy are spent. A post-copy switch or an abort goes to the
cloud (the migration ends there at once). Every call is recorded, in order, for the
checks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from hostmaint.coordinator import errors
from hostmaint.coordinator.agents import AgentStatus, Health
from hostmaint.coordinator.drivers.base import MigrationRef, MigrationState
from hostmaint.protos import agent_pb2 as apb
from tests.coordinator.simdriver import SimDriver

GIB = 1024**3


@dataclass(frozen=True)
class Guest:
    """A guest as its agent reports it; its writer rewrites `working_set_bytes` (None: a
    set larger than any window) at `rate_bytes_per_s`."""

    memory_bytes: int
    rss_bytes: int
    rate_bytes_per_s: float = 0.0
    working_set_bytes: int | None = None

    def reading(self, window_s: float) -> float:
        """What a dirty-rate window of `window_s` reads: unique pages over the window."""
        written = self.rate_bytes_per_s * window_s
        if self.working_set_bytes is not None:
            written = min(written, self.working_set_bytes)
        return written / window_s


@dataclass(frozen=True)
class Call:
    """One agent call: the operation, the host asked, the guest (if one) and what for."""

    operation: str
    host: str
    vm: str = ""
    detail: str = ""
    at: float = 0.0


@dataclass
class SimAgents:
    """A registry of agents over `driver`'s hosts and `guests`."""

    driver: SimDriver
    guests: dict[str, Guest]
    link_bytes_per_s: float
    clock: Callable[[], float] = time.time
    host_memory_bytes: int = 64 * GIB
    # hosts whose libvirt has no cgroup CPU controller: vCPU throttling is refused, and
    # GetHost says so
    no_cpu_controller: set[str] = field(default_factory=set)
    # how often a watch samples (the test's pace, not the interval the coordinator asks)
    sample_interval_s: float = 0.02
    # when set: the agents' background dirty-rate readings (windows of 1, 2, 4 and 8 s)
    # were all taken at this time, and ListDomains reports them
    readings_at: float | None = None
    # hosts whose agent is not serving (a host away for its maintenance)
    not_serving: set[str] = field(default_factory=set)
    # what each host's agent reports as its hypervisor and libvirt versions
    versions: dict[str, tuple[str, str]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    _rounds: dict[str, int] = field(default_factory=dict)
    _limits_ms: dict[str, int] = field(default_factory=dict)
    _postcopy: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- what the test sets and reads -------------------------------------------------

    def set_round(self, vm: str, iteration: int) -> None:
        """QEMU's dirty-bitmap sync count of the VM's migration from now on (1: the first
        pass runs, 2: it is done, then one more per round)."""
        with self._lock:
            self._rounds[vm] = iteration

    def record(self, operation: str, host: str, vm: str = "", detail: str = "") -> None:
        with self._lock:
            self.calls.append(Call(operation, host, vm, detail, self.clock()))

    def called(self, operation: str, vm: str | None = None) -> list[Call]:
        with self._lock:
            return [
                c for c in self.calls if c.operation == operation and (vm is None or c.vm == vm)
            ]

    # -- the registry's contract --------------------------------------------------------

    def hosts(self) -> list[str]:
        return sorted(h.name for h in self.driver.list_hosts())

    def client(self, host: str) -> SimAgent:
        if host not in self.hosts():
            raise errors.UnknownHost(host)
        return SimAgent(self, host)

    def probe(self, host: str) -> AgentStatus:
        if host in self.not_serving:
            return AgentStatus(host, f"sim:{host}", Health.NOT_SERVING, "away", None, self.clock())
        report = self.client(host).get_host()
        return AgentStatus(host, f"sim:{host}", Health.SERVING, "", report, self.clock())

    def last(self, host: str) -> AgentStatus | None:
        return self.probe(host)

    # -- what the agents read of the cloud -------------------------------------------------

    def _job(self, vm: str, host: str) -> MigrationRef | None:
        """The VM's migration running from `host`, if one runs."""
        ref = self.driver.latest_migration(vm)
        if ref is None:
            return None
        status = self.driver.get_migration(ref)
        if status.state is not MigrationState.RUNNING or status.source_host != host:
            return None
        return ref


@dataclass
class SimAgent:
    """One host's agent."""

    agents: SimAgents
    host: str

    def health(self) -> str:
        return Health.SERVING

    def get_host(self) -> apb.HostReport:
        report = apb.HostReport(
            hostname=self.host,
            libvirt_uri=f"sim:///{self.host}",
            memory_total_bytes=self.agents.host_memory_bytes,
            cpu_count=64,
        )
        hv, lv = self.agents.versions.get(self.host, ("7.2.0", "9.0.0"))
        report.hypervisor_version, report.libvirt_version = hv, lv
        throttle = self.host not in self.agents.no_cpu_controller
        report.capabilities.vcpu_throttle.CopyFrom(
            apb.Capability(
                available=throttle, reason="" if throttle else "no cgroup CPU controller"
            )
        )
        report.capabilities.postcopy.CopyFrom(apb.Capability(available=True))
        return report

    def _here(self) -> list[str]:
        return sorted(u for u, h in self.agents.driver.placement().items() if h == self.host)

    def list_domains(self, uuids: list[str] | None = None) -> list[apb.Domain]:
        here = self._here()
        if uuids and not set(uuids) <= set(here):
            raise errors.AgentRefused(self.host, "ListDomains", "NOT_FOUND", "no such domain")
        out = []
        for uuid in uuids or here:
            guest = self.agents.guests[uuid]
            migrating = self.agents._job(uuid, self.host) is not None
            domain = apb.Domain(
                uuid=uuid,
                name=uuid,
                state=apb.DOMAIN_STATE_RUNNING,
                memory_max_bytes=guest.memory_bytes,
                memory_current_bytes=guest.memory_bytes,
                rss_bytes=guest.rss_bytes,
                vcpus=2,
                persistent=True,
                migrating=migrating,
            )
            if self.agents.readings_at is not None:
                at = Timestamp()
                at.FromNanoseconds(int(self.agents.readings_at * 1e9))
                domain.dirty_rates.extend(
                    apb.DirtyRate(bytes_per_s=guest.reading(w), window_s=w, measured_at=at)
                    for w in (1, 2, 4, 8)
                )
            if migrating:
                domain.migration_blockers.append(
                    apb.MigrationBlocker(
                        kind=apb.BLOCKER_KIND_MIGRATION_RUNNING,
                        reason="a migration job runs",
                        hard=True,
                    )
                )
            out.append(domain)
        return out

    def measure_dirty_rate(self, uuids: list[str], window_s: int) -> dict[str, apb.DirtyRate]:
        self.agents.record("MeasureDirtyRate", self.host, ",".join(uuids), f"{window_s}s")
        return {
            u: apb.DirtyRate(
                bytes_per_s=self.agents.guests[u].reading(window_s),
                window_s=window_s,
                method=apb.DIRTY_RATE_METHOD_DIRTY_BITMAP,
            )
            for u in uuids
        }

    def check_cpu(self, cpu: apb.CpuDefinition) -> apb.CheckCpuCompatibilityResponse:
        return apb.CheckCpuCompatibilityResponse(compatible=True)

    def watch(
        self, uuid: str, interval_s: float, start_timeout_s: float, deadline_s: float
    ) -> Iterator[apb.MigrationProgress]:
        agents = self.agents
        agents.record("WatchMigration", self.host, uuid)
        ref = agents._job(uuid, self.host)
        if ref is None:
            raise errors.AgentRefused(
                self.host, "WatchMigration", "FAILED_PRECONDITION", "no migration job"
            )
        guest = agents.guests[uuid]
        while True:
            status = agents.driver.get_migration(ref)
            if status.state.finished:
                ok = status.state is MigrationState.COMPLETED
                yield apb.MigrationProgress(
                    domain_uuid=uuid,
                    phase=apb.MIGRATION_PHASE_COMPLETED if ok else apb.MIGRATION_PHASE_FAILED,
                    downtime_ms=120 if ok else 0,
                    final=True,
                    error="" if ok else f"migration {status.state}",
                )
                return
            with agents._lock:
                iteration = agents._rounds.get(uuid, 1)
                limit_ms = agents._limits_ms.get(uuid, 0)
                postcopy = uuid in agents._postcopy
            pc = agents.driver.postcopy_phase(ref)
            if pc == "paused":
                yield apb.MigrationProgress(
                    domain_uuid=uuid,
                    phase=apb.MIGRATION_PHASE_POSTCOPY_PAUSED,
                    iteration=iteration,
                    memory_total_bytes=guest.memory_bytes,
                )
                time.sleep(agents.sample_interval_s)
                continue
            if not limit_ms:  # what the job started with (QEMU's default: 300 ms)
                started = [s for s in agents.driver.starts() if s.instance_uuid == uuid]
                limit_ms = started[-1].options.max_downtime_ms or 300
            yield apb.MigrationProgress(
                domain_uuid=uuid,
                phase=apb.MIGRATION_PHASE_POSTCOPY if postcopy else apb.MIGRATION_PHASE_PRECOPY,
                iteration=iteration,
                memory_total_bytes=guest.memory_bytes,
                memory_remaining_bytes=guest.working_set_bytes or guest.memory_bytes // 2,
                bandwidth_bytes_per_s=agents.link_bytes_per_s,
                max_downtime_ms=limit_ms,
            )
            time.sleep(agents.sample_interval_s)

    def tune(self, request: apb.TuneMigrationRequest) -> apb.TuneMigrationResponse:
        agents, uuid = self.agents, request.domain_uuid
        detail = str(request).replace("\n", " ").strip()
        agents.record("TuneMigration", self.host, uuid, detail)
        if uuid not in self._here():
            raise errors.AgentRefused(self.host, "TuneMigration", "NOT_FOUND", "no such domain")
        answer = apb.TuneMigrationResponse()
        if request.HasField("vcpu_throttle_pct"):
            if self.host in agents.no_cpu_controller:
                raise errors.AgentRefused(
                    self.host, "TuneMigration", "FAILED_PRECONDITION", "no cgroup CPU controller"
                )
            if request.vcpu_throttle_pct == 0:
                return answer  # lifting the cap needs no job
        ref = agents._job(uuid, self.host)
        if ref is None:
            raise errors.AgentRefused(self.host, "TuneMigration", "FAILED_PRECONDITION", "no job")
        if request.HasField("max_downtime_ms"):
            with agents._lock:
                agents._limits_ms[uuid] = request.max_downtime_ms
            answer.max_downtime_ms = request.max_downtime_ms
        if request.HasField("bandwidth_bytes_per_s"):
            answer.previous_bandwidth_bytes_per_s = 0
        if request.start_postcopy:
            with agents._lock:
                agents._postcopy.add(uuid)
            agents.driver.force_complete(ref)
        if request.abort:
            agents.driver.abort(ref)
        return answer
