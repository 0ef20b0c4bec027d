"""gRPC HostAgent: proto in, AgentService call, proto out, and one error table."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from hostmaint.agent import errors
from hostmaint.agent.migrations import Sample
from hostmaint.agent.service import AgentService
from hostmaint.agent.types import (
    Blocker,
    BlockerKind,
    Capability,
    CpuDefinition,
    CpuFeature,
    DirtyRate,
    DirtyRateMethod,
    Domain,
    DomainState,
    MigrationPhase,
    MigrationRequest,
    TuningCapabilities,
)
from hostmaint.protos import agent_pb2 as pb
from hostmaint.protos import agent_pb2_grpc

LOG = logging.getLogger(__name__)
T = TypeVar("T")
SERVICE_NAME = "hostmaint.v1.HostAgent"
# The RPCs that change a domain or its migration: only allowed coordinators call them.
MUTATING_METHODS = frozenset(
    f"/{SERVICE_NAME}/{name}" for name in ("Migrate", "TuneMigration", "ResumeMigration")
)

STATUS_CODES: dict[type[errors.AgentError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.DomainNotFound: grpc.StatusCode.NOT_FOUND,
    errors.NoMigrationJob: grpc.StatusCode.FAILED_PRECONDITION,
    errors.OperationRefused: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unsupported: grpc.StatusCode.FAILED_PRECONDITION,
    errors.MigrationBusy: grpc.StatusCode.ABORTED,
    errors.HypervisorUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.HypervisorError: grpc.StatusCode.INTERNAL,
}

_STATES = {
    DomainState.RUNNING: pb.DOMAIN_STATE_RUNNING,
    DomainState.BLOCKED: pb.DOMAIN_STATE_BLOCKED,
    DomainState.PAUSED: pb.DOMAIN_STATE_PAUSED,
    DomainState.SHUTDOWN: pb.DOMAIN_STATE_SHUTDOWN,
    DomainState.SHUTOFF: pb.DOMAIN_STATE_SHUTOFF,
    DomainState.CRASHED: pb.DOMAIN_STATE_CRASHED,
    DomainState.PMSUSPENDED: pb.DOMAIN_STATE_PMSUSPENDED,
}
_METHODS = {
    DirtyRateMethod.PAGE_SAMPLING: pb.DIRTY_RATE_METHOD_PAGE_SAMPLING,
    DirtyRateMethod.DIRTY_BITMAP: pb.DIRTY_RATE_METHOD_DIRTY_BITMAP,
    DirtyRateMethod.DIRTY_RING: pb.DIRTY_RATE_METHOD_DIRTY_RING,
}
_METHODS_IN = {v: k for k, v in _METHODS.items()}
_BLOCKERS = {
    BlockerKind.NOT_RUNNING: pb.BLOCKER_KIND_NOT_RUNNING,
    BlockerKind.HOST_DEVICE: pb.BLOCKER_KIND_HOST_DEVICE,
    BlockerKind.PCI_PASSTHROUGH: pb.BLOCKER_KIND_PCI_PASSTHROUGH,
    BlockerKind.LOCAL_DISK: pb.BLOCKER_KIND_LOCAL_DISK,
    BlockerKind.MIGRATION_RUNNING: pb.BLOCKER_KIND_MIGRATION_RUNNING,
}
_PHASES = {
    MigrationPhase.SETUP: pb.MIGRATION_PHASE_SETUP,
    MigrationPhase.PRECOPY: pb.MIGRATION_PHASE_PRECOPY,
    MigrationPhase.POSTCOPY: pb.MIGRATION_PHASE_POSTCOPY,
    MigrationPhase.COMPLETED: pb.MIGRATION_PHASE_COMPLETED,
    MigrationPhase.FAILED: pb.MIGRATION_PHASE_FAILED,
    MigrationPhase.CANCELLED: pb.MIGRATION_PHASE_CANCELLED,
    MigrationPhase.POSTCOPY_PAUSED: pb.MIGRATION_PHASE_POSTCOPY_PAUSED,
}


def _abort(context: grpc.ServicerContext, error: errors.AgentError) -> NoReturn:
    code = STATUS_CODES.get(type(error), grpc.StatusCode.INTERNAL)
    context.abort(code, str(error))
    raise AssertionError("context.abort returns only by raising")


def translated(method: Callable[..., T]) -> Callable[..., T]:
    """Maps our errors to status codes; anything else is INTERNAL with a logged traceback."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> T:
        try:
            return method(self, request, context)
        except errors.AgentError as e:
            _abort(context, e)

    return wrapper


def translated_stream(method: Callable[..., Iterator[T]]) -> Callable[..., Iterator[T]]:
    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[T]:
        try:
            yield from method(self, request, context)
        except errors.AgentError as e:
            _abort(context, e)

    return wrapper


def timestamp(epoch_s: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(epoch_s * 1e9))
    return ts


def capability_to_pb(capability: Capability) -> pb.Capability:
    return pb.Capability(
        available=capability.available,
        reason=capability.reason,
        decided_by=capability.decided_by,
    )


def capabilities_to_pb(capabilities: TuningCapabilities) -> pb.TuningCapabilities:
    return pb.TuningCapabilities(
        vcpu_throttle=capability_to_pb(capabilities.vcpu_throttle),
        postcopy=capability_to_pb(capabilities.postcopy),
    )


def cpu_to_pb(cpu: CpuDefinition) -> pb.CpuDefinition:
    return pb.CpuDefinition(
        mode=cpu.mode,
        model=cpu.model,
        vendor=cpu.vendor,
        arch=cpu.arch,
        features=[pb.CpuFeature(name=f.name, policy=f.policy) for f in cpu.features],
        xml=cpu.xml,
    )


def cpu_from_pb(cpu: pb.CpuDefinition) -> CpuDefinition:
    return CpuDefinition(
        mode=cpu.mode,
        model=cpu.model,
        vendor=cpu.vendor,
        arch=cpu.arch,
        features=tuple(CpuFeature(f.name, f.policy) for f in cpu.features),
        xml=cpu.xml,
    )


def dirty_rate_to_pb(rate: DirtyRate) -> pb.DirtyRate:
    return pb.DirtyRate(
        bytes_per_s=rate.bytes_per_s,
        window_s=rate.window_s,
        method=_METHODS[rate.method],
        measured_at=timestamp(rate.measured_at),
    )


def _blocker_to_pb(blocker: Blocker) -> pb.MigrationBlocker:
    return pb.MigrationBlocker(
        kind=_BLOCKERS[blocker.kind], reason=blocker.reason, hard=blocker.hard
    )


def domain_to_pb(domain: Domain) -> pb.Domain:
    c = domain.config
    msg = pb.Domain(
        uuid=c.uuid,
        name=c.name,
        state=_STATES.get(domain.state, pb.DOMAIN_STATE_UNSPECIFIED),
        memory_max_bytes=c.memory_max_bytes,
        memory_current_bytes=c.memory_current_bytes,
        rss_bytes=domain.rss_bytes,
        unused_bytes=domain.unused_bytes,
        vcpus=c.vcpus,
        cpu=cpu_to_pb(c.cpu),
        disks=[
            pb.Disk(
                target=d.target,
                device=d.device,
                source_type=d.source_type,
                source=d.source,
                shared=d.shared,
                readonly=d.readonly,
            )
            for d in c.disks
        ],
        migration_blockers=[_blocker_to_pb(b) for b in domain.blockers],
        persistent=domain.persistent,
        migrating=domain.migrating,
        vcpu_throttle_pct=domain.vcpu_throttle_pct,
        postcopy_failed=domain.postcopy_failed,
    )
    if c.nova is not None:
        msg.nova.CopyFrom(
            pb.NovaInstance(
                instance_uuid=c.nova.instance_uuid,
                name=c.nova.name,
                flavor_name=c.nova.flavor_name,
                project_uuid=c.nova.project_uuid,
                user_uuid=c.nova.user_uuid,
            )
        )
    if domain.dirty_rate is not None:
        msg.dirty_rate.CopyFrom(dirty_rate_to_pb(domain.dirty_rate))
    msg.dirty_rates.extend(dirty_rate_to_pb(r) for r in domain.dirty_rates)
    return msg


def sample_to_pb(domain_uuid: str, sample: Sample) -> pb.MigrationProgress:
    s = sample.stats
    return pb.MigrationProgress(
        domain_uuid=domain_uuid,
        phase=_PHASES[s.phase],
        iteration=s.iteration,
        memory_total_bytes=s.memory_total_bytes,
        memory_processed_bytes=s.memory_processed_bytes,
        memory_remaining_bytes=s.memory_remaining_bytes,
        dirty_rate_bytes_per_s=s.dirty_rate_bytes_per_s,
        bandwidth_bytes_per_s=s.bandwidth_bytes_per_s,
        auto_converge_throttle_pct=s.auto_converge_throttle_pct,
        max_downtime_ms=sample.max_downtime_ms,
        max_downtime_set_by=sample.max_downtime_set_by,
        downtime_ms=s.downtime_ms,
        elapsed_ms=s.elapsed_ms,
        data_total_bytes=s.data_total_bytes,
        data_processed_bytes=s.data_processed_bytes,
        data_remaining_bytes=s.data_remaining_bytes,
        final=sample.final,
        error=s.error,
        sampled_at=timestamp(sample.sampled_at),
    )


def _method_from_pb(value: int) -> DirtyRateMethod | None:
    if value == pb.DIRTY_RATE_METHOD_UNSPECIFIED:
        return None
    if value not in _METHODS_IN:
        raise errors.InvalidArgument("method", f"unknown dirty-rate method {value}")
    return _METHODS_IN[value]  # type: ignore[index]


class HostAgentServicer(agent_pb2_grpc.HostAgentServicer):
    def __init__(self, service: AgentService, clock: Callable[[], float]) -> None:
        self._service = service
        self._clock = clock

    @translated
    def GetHost(self, request: pb.GetHostRequest, context: grpc.ServicerContext) -> pb.HostReport:
        info, load, capabilities = self._service.host()
        return pb.HostReport(
            hostname=info.hostname,
            libvirt_uri=info.libvirt_uri,
            host_uuid=info.host_uuid,
            hypervisor_type=info.hypervisor_type,
            hypervisor_version=info.hypervisor_version,
            libvirt_version=info.libvirt_version,
            cpu=cpu_to_pb(info.cpu),
            memory_total_bytes=info.memory_total_bytes,
            memory_free_bytes=info.memory_free_bytes,
            cpu_count=info.cpu_count,
            load_1m=load.load_1m,
            load_5m=load.load_5m,
            load_15m=load.load_15m,
            domain_count=info.domain_count,
            running_domain_count=info.running_domain_count,
            qemu_rss_bytes=load.qemu_rss_bytes,
            migration_nic_speed_mbps=load.migration_nic_speed_mbps,
            migration_interface=load.migration_interface,
            reported_at=timestamp(self._clock()),
            capabilities=capabilities_to_pb(capabilities),
        )

    @translated
    def ListDomains(
        self, request: pb.ListDomainsRequest, context: grpc.ServicerContext
    ) -> pb.ListDomainsResponse:
        domains = self._service.domains(list(request.domain_uuids))
        return pb.ListDomainsResponse(domains=[domain_to_pb(d) for d in domains])

    @translated
    def MeasureDirtyRate(
        self, request: pb.MeasureDirtyRateRequest, context: grpc.ServicerContext
    ) -> pb.MeasureDirtyRateResponse:
        rates = self._service.measure_dirty_rate(
            list(request.domain_uuids), request.window_s, _method_from_pb(request.method)
        )
        return pb.MeasureDirtyRateResponse(
            results=[
                pb.DirtyRateResult(domain_uuid=uuid, rate=dirty_rate_to_pb(rate))
                for uuid, rate in sorted(rates.items())
            ]
        )

    @translated
    def CheckCpuCompatibility(
        self, request: pb.CheckCpuCompatibilityRequest, context: grpc.ServicerContext
    ) -> pb.CheckCpuCompatibilityResponse:
        result = self._service.check_cpu(cpu_from_pb(request.cpu))
        return pb.CheckCpuCompatibilityResponse(
            compatible=result.compatible,
            result=result.result,
            reason=result.reason,
            missing_features=list(result.missing_features),
        )

    @translated_stream
    def WatchMigration(
        self, request: pb.WatchMigrationRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.MigrationProgress]:
        samples = self._service.watch(
            request.domain_uuid, request.interval_s, request.start_timeout_s
        )
        for sample in samples:
            if not context.is_active():
                return
            yield sample_to_pb(request.domain_uuid.lower(), sample)

    @translated
    def TuneMigration(
        self, request: pb.TuneMigrationRequest, context: grpc.ServicerContext
    ) -> pb.TuneMigrationResponse:
        tuned = self._service.tune(
            request.domain_uuid,
            max_downtime_ms=request.max_downtime_ms
            if request.HasField("max_downtime_ms")
            else None,
            bandwidth_bytes_per_s=(
                request.bandwidth_bytes_per_s if request.HasField("bandwidth_bytes_per_s") else None
            ),
            start_postcopy=request.start_postcopy,
            abort=request.abort,
            vcpu_throttle_pct=(
                request.vcpu_throttle_pct if request.HasField("vcpu_throttle_pct") else None
            ),
            lower_max_downtime=request.lower_max_downtime,
        )
        answer = pb.TuneMigrationResponse(
            applied=tuned.applied, max_downtime_ms=tuned.max_downtime_ms
        )
        if tuned.previous_bandwidth_bytes_per_s is not None:
            answer.previous_bandwidth_bytes_per_s = tuned.previous_bandwidth_bytes_per_s
        return answer

    @translated
    def Migrate(
        self, request: pb.MigrateRequest, context: grpc.ServicerContext
    ) -> pb.MigrateResponse:
        o = request.options
        started = self._service.migrate(
            MigrationRequest(
                domain_uuid=request.domain_uuid,
                destination_uri=request.destination_uri,
                migration_uri=o.migration_uri,
                bandwidth_bytes_per_s=o.bandwidth_bytes_per_s,
                max_downtime_ms=o.max_downtime_ms,
                auto_converge=o.auto_converge,
                auto_converge_initial_pct=o.auto_converge_initial_pct,
                auto_converge_increment_pct=o.auto_converge_increment_pct,
                allow_postcopy=o.allow_postcopy,
                parallel_connections=o.parallel_connections,
                copy_storage=o.copy_storage,
            )
        )
        return pb.MigrateResponse(
            domain_uuid=request.domain_uuid.lower(), started_at=timestamp(started)
        )

    @translated
    def ResumeMigration(
        self, request: pb.ResumeMigrationRequest, context: grpc.ServicerContext
    ) -> pb.ResumeMigrationResponse:
        resumed = self._service.resume(
            request.domain_uuid, request.destination_uri, request.migration_uri
        )
        return pb.ResumeMigrationResponse(
            domain_uuid=resumed.domain_uuid,
            destination_uri=resumed.destination_uri,
            resumed_at=timestamp(self._clock()),
        )
