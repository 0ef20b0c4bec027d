"""The coordinator's view of the agents: where they are, whether they serve, what they say.

Every call has a deadline. Transport failures become AgentUnavailable, error
statuses AgentRefused; callers decide what to do (plan around a target, refuse
a drain whose source agent is down).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hostmaint.common import daemon
from hostmaint.coordinator import errors
from hostmaint.coordinator.drivers.base import DriverError
from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import agent_pb2_grpc

LOG = logging.getLogger(__name__)
AGENT_SERVICE = "hostmaint.v1.HostAgent"
INSECURE_OPTION = "[agents] insecure"
T = TypeVar("T")
_TRANSPORT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)


class Health:
    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"
    UNKNOWN = "UNKNOWN"
    UNREACHABLE = "UNREACHABLE"


@dataclass(frozen=True)
class AgentStatus:
    host: str
    address: str
    health: str
    error: str
    report: apb.HostReport | None
    checked_at: float


# Told of every failed call to an agent: (host, operation, status code name).
CallFailed = Callable[[str, str, str], None]


def ignore_call_failure(host: str, operation: str, code: str) -> None:
    pass


class AgentClient:
    """One agent, reached over one channel."""

    def __init__(
        self,
        host: str,
        address: str,
        channel: grpc.Channel,
        timeout_s: float,
        on_failure: CallFailed = ignore_call_failure,
    ) -> None:
        self.host = host
        self._on_failure = on_failure
        self.address = address
        self._channel = channel
        self._stub = agent_pb2_grpc.HostAgentStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self.timeout_s = timeout_s

    def close(self) -> None:
        self._channel.close()

    def _translate(self, operation: str, e: grpc.RpcError) -> errors.CoordinatorError:
        code = e.code()
        details = e.details() or ""
        self._on_failure(self.host, operation, code.name)
        if code in _TRANSPORT:
            return errors.AgentUnavailable(self.host, self.address, f"{code.name}: {details}")
        return errors.AgentRefused(self.host, operation, code.name, details)

    def _call(self, operation: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except grpc.RpcError as e:
            raise self._translate(operation, e) from e

    def health(self) -> str:
        try:
            answer = self._health.Check(
                health_pb2.HealthCheckRequest(service=AGENT_SERVICE), timeout=self.timeout_s
            )
        except grpc.RpcError as e:
            code = e.code()
            self._on_failure(self.host, "Health", code.name)
            return Health.UNREACHABLE if code in _TRANSPORT else Health.UNKNOWN
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))

    def get_host(self) -> apb.HostReport:
        report: apb.HostReport = self._call(
            "GetHost", lambda: self._stub.GetHost(apb.GetHostRequest(), timeout=self.timeout_s)
        )
        return report

    def list_domains(self, uuids: list[str] | None = None) -> list[apb.Domain]:
        request = apb.ListDomainsRequest(domain_uuids=uuids or [])
        answer = self._call(
            "ListDomains", lambda: self._stub.ListDomains(request, timeout=self.timeout_s)
        )
        return list(answer.domains)

    def measure_dirty_rate(self, uuids: list[str], window_s: int) -> dict[str, apb.DirtyRate]:
        request = apb.MeasureDirtyRateRequest(domain_uuids=uuids, window_s=window_s)
        answer = self._call(
            "MeasureDirtyRate",
            lambda: self._stub.MeasureDirtyRate(request, timeout=self.timeout_s + window_s * 2),
        )
        return {r.domain_uuid: r.rate for r in answer.results}

    def check_cpu(self, cpu: apb.CpuDefinition) -> apb.CheckCpuCompatibilityResponse:
        request = apb.CheckCpuCompatibilityRequest(cpu=cpu)
        answer: apb.CheckCpuCompatibilityResponse = self._call(
            "CheckCpuCompatibility",
            lambda: self._stub.CheckCpuCompatibility(request, timeout=self.timeout_s),
        )
        return answer

    def watch(
        self, uuid: str, interval_s: float, start_timeout_s: float, deadline_s: float
    ) -> Iterator[apb.MigrationProgress]:
        request = apb.WatchMigrationRequest(
            domain_uuid=uuid, interval_s=interval_s, start_timeout_s=start_timeout_s
        )
        stream = self._stub.WatchMigration(request, timeout=deadline_s)
        try:
            yield from stream
        except grpc.RpcError as e:
            raise self._translate("WatchMigration", e) from e
        finally:
            stream.cancel()

    def tune(self, request: apb.TuneMigrationRequest) -> apb.TuneMigrationResponse:
        answer: apb.TuneMigrationResponse = self._call(
            "TuneMigration", lambda: self._stub.TuneMigration(request, timeout=self.timeout_s)
        )
        return answer

    def migrate(self, request: apb.MigrateRequest) -> apb.MigrateResponse:
        answer: apb.MigrateResponse = self._call(
            "Migrate", lambda: self._stub.Migrate(request, timeout=self.timeout_s + 15)
        )
        return answer

    def resume(self, request: apb.ResumeMigrationRequest) -> apb.ResumeMigrationResponse:
        """Resumes a broken post-copy (the agent waits a few seconds for libvirt to take it)."""
        answer: apb.ResumeMigrationResponse = self._call(
            "ResumeMigration",
            lambda: self._stub.ResumeMigration(request, timeout=self.timeout_s + 15),
        )
        return answer


class AgentRegistry:
    """Every known agent, its health and last report, refreshed by `refresh()`."""

    def __init__(
        self,
        addresses: Mapping[str, str],
        *,
        timeout_s: float,
        tls: daemon.TlsFiles | None,
        clock: Callable[[], float],
        discover: Callable[[], Mapping[str, str]] | None = None,
        insecure: bool = False,
        on_call_failed: CallFailed = ignore_call_failure,
    ) -> None:
        """Plaintext to an agent off loopback is refused unless `insecure`.

        `on_call_failed` is told of every call to an agent that fails (the metrics).

        Raises daemon.InsecureRefused at once for a configured address that breaks
        the rule; a discovered one is refused when first used.
        """
        self._static = dict(addresses)
        self._timeout_s = timeout_s
        self._tls = tls
        self._insecure = insecure
        for address in self._static.values():
            daemon.check_plaintext_target(address, tls, insecure, INSECURE_OPTION)
        self._clock = clock
        self._discover = discover
        self._on_call_failed = on_call_failed
        self._lock = threading.Lock()
        self._clients: dict[str, AgentClient] = {}
        self._status: dict[str, AgentStatus] = {}

    def hosts(self) -> list[str]:
        known = dict(self._discovered())
        known.update(self._static)
        return sorted(known)

    def _discovered(self) -> Mapping[str, str]:
        if self._discover is None:
            return {}
        try:
            return self._discover()
        except (
            errors.CoordinatorError,
            DriverError,
        ) as e:  # a cloud outage must not hide the agents
            LOG.warning("agent discovery failed error=%s", e)
            return {}

    def address(self, host: str) -> str:
        if host in self._static:
            return self._static[host]
        found = self._discovered().get(host)
        if found is None:
            raise errors.UnknownHost(host)
        return found

    def client(self, host: str) -> AgentClient:
        with self._lock:
            client = self._clients.get(host)
        if client is not None:
            return client
        address = self.address(host)
        if host not in self._static:
            try:
                daemon.check_plaintext_target(address, self._tls, self._insecure, INSECURE_OPTION)
            except daemon.InsecureRefused as e:
                raise errors.AgentUnavailable(host, address, str(e)) from e
        client = AgentClient(
            host,
            address,
            daemon.channel(address, self._tls),
            self._timeout_s,
            self._on_call_failed,
        )
        with self._lock:
            return self._clients.setdefault(host, client)

    def probe(self, host: str) -> AgentStatus:
        """Health plus a fresh host report; never raises for a down agent."""
        try:
            client = self.client(host)
        except errors.AgentUnavailable as e:
            status = AgentStatus(host, e.address, Health.UNREACHABLE, str(e), None, self._clock())
            with self._lock:
                self._status[host] = status
            return status
        health = client.health()
        report = None
        error = ""
        if health == Health.SERVING:
            try:
                report = client.get_host()
            except errors.CoordinatorError as e:
                error = str(e)
        elif health == Health.UNREACHABLE:
            error = f"no answer from {client.address}"
        else:
            error = f"agent health is {health}"
        status = AgentStatus(host, client.address, health, error, report, self._clock())
        with self._lock:
            self._status[host] = status
        return status

    def probe_all(self) -> list[AgentStatus]:
        """Every agent at once: one slow or dead agent costs one timeout, not one each."""
        hosts = self.hosts()
        if not hosts:
            return []
        with ThreadPoolExecutor(
            max_workers=min(16, len(hosts)), thread_name_prefix="probe"
        ) as pool:
            return list(pool.map(self.probe, hosts))

    def last(self, host: str) -> AgentStatus | None:
        with self._lock:
            return self._status.get(host)

    def statuses(self) -> list[AgentStatus]:
        """Every agent probed so far, as last probed, by host."""
        with self._lock:
            return [self._status[h] for h in sorted(self._status)]

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            c.close()
