"""A source agent and a cloud for following one migration that never progresses.

The agent reports what its host can tune (``capabilities``; unset: not reported), one
domain, and a migration that stays where it is (each sample two seconds later on the
test's clock) until the cloud's record ends; it records every TuneMigration. The cloud
is the simulated one (``simdriver``), whose migration lasts long enough for the
escalation ladder to reach its last step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hostmaint.coordinator.agents import AgentStatus, Health
from hostmaint.coordinator.drivers.base import Instance, InstanceState, MigrationState
from hostmaint.coordinator.executor import Executor, ExecutorSettings
from hostmaint.coordinator.journal import Journal, make_engine
from hostmaint.coordinator.model import DrainPolicy, Link
from hostmaint.protos import agent_pb2 as apb
from tests.coordinator.simdriver import SimDriver, SimHost

GIB = 1024**3
MIB = 1024**2
LINK_BYTES_PER_S = 1.25e9
VM = "6f1c1a52-1b7e-4d0e-9d1a-00000000c0de"
NO_CPU_CONTROLLER = "libvirt refuses them: cgroup CPU controller is not mounted"
CAN = apb.Capability(available=True, decided_by="asked")
CANNOT_THROTTLE = apb.TuningCapabilities(
    vcpu_throttle=apb.Capability(available=False, reason=NO_CPU_CONTROLLER, decided_by="asked"),
    postcopy=CAN,
)
CAN_ALL = apb.TuningCapabilities(vcpu_throttle=CAN, postcopy=CAN)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Agent:
    """Every host's agent: its report, one domain per VM of the source, zero dirty rates
    (or ``rate``), and migrations that never progress until the cloud's record ends."""

    clock: Clock
    capabilities: apb.TuningCapabilities | None
    rate_bytes_per_s: float = 0.0
    driver: SimDriver | None = None
    tunes: list[apb.TuneMigrationRequest] = field(default_factory=list)

    def health(self) -> str:
        return Health.SERVING

    def report(self) -> apb.HostReport:
        report = apb.HostReport(hostname="h", hypervisor_type="QEMU")
        if self.capabilities is not None:
            report.capabilities.CopyFrom(self.capabilities)
        return report

    def list_domains(self, uuids: list[str] | None = None) -> list[apb.Domain]:
        return [
            apb.Domain(
                uuid=VM,
                name="instance-c0de",
                state=apb.DOMAIN_STATE_RUNNING,
                memory_max_bytes=16 * GIB,
                rss_bytes=8 * GIB,
                vcpus=2,
            )
        ]

    def measure_dirty_rate(self, uuids: list[str], window_s: int) -> dict[str, apb.DirtyRate]:
        return {
            u: apb.DirtyRate(bytes_per_s=self.rate_bytes_per_s, window_s=window_s) for u in uuids
        }

    def watch(
        self, uuid: str, interval_s: float, start_timeout_s: float, deadline_s: float
    ) -> Iterator[apb.MigrationProgress]:
        assert self.driver is not None
        ref = self.driver.latest_migration(uuid)
        assert ref is not None
        for iteration in range(1, 200):
            state = self.driver.get_migration(ref).state
            if state is not MigrationState.RUNNING:
                phase = apb.MIGRATION_PHASE_CANCELLED
                if state is MigrationState.COMPLETED:
                    phase = apb.MIGRATION_PHASE_COMPLETED
                yield apb.MigrationProgress(domain_uuid=uuid, phase=phase, final=True)
                return
            self.clock.now += 2.0
            yield apb.MigrationProgress(
                domain_uuid=uuid,
                phase=apb.MIGRATION_PHASE_PRECOPY,
                iteration=iteration,
                memory_total_bytes=16 * GIB,
                memory_remaining_bytes=2 * GIB,
                bandwidth_bytes_per_s=1e9,
                max_downtime_ms=300,
            )
        yield apb.MigrationProgress(domain_uuid=uuid, phase=apb.MIGRATION_PHASE_FAILED, final=True)

    def tune(self, request: apb.TuneMigrationRequest) -> apb.TuneMigrationResponse:
        self.tunes.append(request)
        return apb.TuneMigrationResponse(max_downtime_ms=request.max_downtime_ms)


@dataclass
class Registry:
    agent: Agent

    def probe(self, host: str) -> AgentStatus:
        return AgentStatus(
            host, "addr", Health.SERVING, "", self.agent.report(), self.agent.clock()
        )

    def client(self, host: str) -> Agent:
        return self.agent


def executor(tmp_path: Path, agent: Agent, settings: ExecutorSettings | None = None) -> Executor:
    driver = SimDriver(
        [SimHost("src", 64 * 1024, 64), SimHost("dst", 64 * 1024, 64)],
        [Instance(VM, "writer", "src", "p", InstanceState.ACTIVE, None, "m1.big", 2, 16 * 1024)],
        clock=agent.clock,
        link=Link(LINK_BYTES_PER_S),
        time_scale=1000.0,  # it never ends on its own: the ladder ends it
    )
    agent.driver = driver
    tmp_path.mkdir(exist_ok=True)
    journal = Journal(make_engine(f"sqlite:///{tmp_path / 'j.db'}"), clock=agent.clock)
    settings = settings or ExecutorSettings(
        defaults=DrainPolicy(), link_bandwidth_bytes_per_s=LINK_BYTES_PER_S, max_attempts=1
    )
    return Executor(driver, Registry(agent), journal, settings, clock=agent.clock)  # type: ignore[arg-type]
