"""The real agent on a real gRPC server against libvirt's test:/// driver."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hostmaint.agent.cmd import SERVICE_NAME, Agent
from hostmaint.protos import agent_pb2 as pb
from hostmaint.protos import agent_pb2_grpc
from tests.agent.conftest import BY_UUID, DB, DONGLE, FROZEN, GPU, STOPPED, WEB

MIB = 1024 * 1024
TIMEOUT = 10


def _code(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        if callable(call):
            call()
    err = info.value
    return err.code(), err.details()  # type: ignore[attr-defined]


def test_health_serves_once_libvirt_is_connected(agent: Agent) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_get_host_reports_the_node(stub: agent_pb2_grpc.HostAgentStub, agent: Agent) -> None:
    host = stub.GetHost(pb.GetHostRequest(), timeout=TIMEOUT)
    assert host.libvirt_uri == agent.conf.libvirt.uri
    assert host.hypervisor_type == "TEST"
    assert host.libvirt_version.startswith("9.")
    assert host.memory_total_bytes == 64 * 1024 * MIB  # the node file's <memory>
    # test:/// node files without NUMA cells report no free memory; real hosts do.
    assert 0 <= host.memory_free_bytes < host.memory_total_bytes
    assert host.cpu_count == 8
    assert host.domain_count == 6
    assert host.running_domain_count == 5  # all but the shut-off one
    assert host.cpu.arch
    assert host.load_1m >= 0
    assert host.reported_at.seconds > 0


def test_list_domains_matches_the_xml(stub: agent_pb2_grpc.HostAgentStub) -> None:
    domains = {
        d.uuid: d for d in stub.ListDomains(pb.ListDomainsRequest(), timeout=TIMEOUT).domains
    }
    assert set(domains) == set(BY_UUID)
    for uuid, d in domains.items():
        spec = BY_UUID[uuid]
        assert d.name == spec.name
        assert d.memory_max_bytes == spec.memory_mib * MIB
        assert d.memory_current_bytes == (spec.current_mib or spec.memory_mib) * MIB
        assert d.vcpus == spec.vcpus
        assert d.persistent
        assert not d.migrating
        assert not d.HasField("dirty_rate")  # never measured
        if spec.nova is None:
            assert not d.HasField("nova")
        else:
            assert d.nova.instance_uuid == uuid
            assert d.nova.name == spec.nova.name
            assert d.nova.flavor_name == spec.nova.flavor
            assert d.nova.project_uuid == spec.nova.project_uuid
            assert d.nova.user_uuid == spec.nova.user_uuid

    web = domains[WEB.uuid]
    assert web.state == pb.DOMAIN_STATE_RUNNING
    assert (web.cpu.mode, web.cpu.model) == ("custom", "EPYC")
    assert [(f.name, f.policy) for f in web.cpu.features] == [
        ("svm", "disable"),
        ("x2apic", "require"),
    ]
    assert [(x.target, x.source_type, x.shared, x.device) for x in web.disks] == [
        ("vda", "network", True, "disk"),
        ("hda", "file", False, "cdrom"),
    ]
    assert web.disks[0].source == "rbd:vms/web-1_disk"
    assert web.disks[1].readonly
    assert list(web.migration_blockers) == []  # shared root disk, config drive is a cdrom

    db = domains[DB.uuid]
    assert [(b.kind, b.hard) for b in db.migration_blockers] == [
        (pb.BLOCKER_KIND_LOCAL_DISK, False)
    ]
    assert "/var/lib/nova/instances/db/disk" in db.migration_blockers[0].reason

    gpu = domains[GPU.uuid]
    assert [(b.kind, b.hard) for b in gpu.migration_blockers] == [
        (pb.BLOCKER_KIND_PCI_PASSTHROUGH, True)
    ]
    assert "0000:3b:00.1" in gpu.migration_blockers[0].reason

    dongle = domains[DONGLE.uuid]
    assert [b.kind for b in dongle.migration_blockers] == [pb.BLOCKER_KIND_HOST_DEVICE]
    assert "usb host device 0x1234:0xbeef" in dongle.migration_blockers[0].reason

    stopped = domains[STOPPED.uuid]
    assert stopped.state == pb.DOMAIN_STATE_SHUTOFF
    assert [(b.kind, b.hard) for b in stopped.migration_blockers] == [
        (pb.BLOCKER_KIND_NOT_RUNNING, True)
    ]
    assert stopped.rss_bytes == 0

    frozen = domains[FROZEN.uuid]
    assert frozen.state == pb.DOMAIN_STATE_PAUSED
    assert "paused" in frozen.migration_blockers[0].reason


def test_list_domains_by_uuid(stub: agent_pb2_grpc.HostAgentStub) -> None:
    answer = stub.ListDomains(
        pb.ListDomainsRequest(domain_uuids=[GPU.uuid.upper()]), timeout=TIMEOUT
    )
    assert [d.uuid for d in answer.domains] == [GPU.uuid]


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (
            pb.ListDomainsRequest(domain_uuids=["not-a-uuid"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "UUID",
        ),
        (
            pb.ListDomainsRequest(domain_uuids=["00000000-0000-4000-8000-00000000dead"]),
            grpc.StatusCode.NOT_FOUND,
            "no domain",
        ),
    ],
)
def test_list_domains_bad_input(
    stub: agent_pb2_grpc.HostAgentStub,
    request_: pb.ListDomainsRequest,
    code: grpc.StatusCode,
    words: str,
) -> None:
    got, details = _code(lambda: stub.ListDomains(request_, timeout=TIMEOUT))
    assert got == code
    assert words in details


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (pb.MeasureDirtyRateRequest(window_s=-1), grpc.StatusCode.INVALID_ARGUMENT, "window_s"),
        (pb.MeasureDirtyRateRequest(window_s=0.5), grpc.StatusCode.INVALID_ARGUMENT, "window_s"),
        (pb.MeasureDirtyRateRequest(window_s=61), grpc.StatusCode.INVALID_ARGUMENT, "window_s"),
        (pb.MeasureDirtyRateRequest(method=42), grpc.StatusCode.INVALID_ARGUMENT, "method"),
        (
            pb.MeasureDirtyRateRequest(domain_uuids=["zzz"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "UUID",
        ),
        (
            pb.MeasureDirtyRateRequest(domain_uuids=["00000000-0000-4000-8000-00000000dead"]),
            grpc.StatusCode.NOT_FOUND,
            "no domain",
        ),
        (
            pb.MeasureDirtyRateRequest(domain_uuids=[STOPPED.uuid]),
            grpc.StatusCode.FAILED_PRECONDITION,
            "shutoff",
        ),
        # What test:/// cannot do is answered clearly; real QEMU is covered by the lab tests.
        (
            pb.MeasureDirtyRateRequest(domain_uuids=[WEB.uuid], window_s=1),
            grpc.StatusCode.FAILED_PRECONDITION,
            "not supported",
        ),
        (
            pb.MeasureDirtyRateRequest(
                domain_uuids=[WEB.uuid], method=pb.DIRTY_RATE_METHOD_DIRTY_RING
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "not supported",
        ),
    ],
)
def test_measure_dirty_rate_errors(
    stub: agent_pb2_grpc.HostAgentStub,
    request_: pb.MeasureDirtyRateRequest,
    code: grpc.StatusCode,
    words: str,
) -> None:
    got, details = _code(lambda: stub.MeasureDirtyRate(request_, timeout=TIMEOUT))
    assert got == code, details
    assert words in details


def test_no_migration_job_is_a_failed_precondition(stub: agent_pb2_grpc.HostAgentStub) -> None:
    got, details = _code(
        lambda: list(
            stub.WatchMigration(pb.WatchMigrationRequest(domain_uuid=WEB.uuid), timeout=TIMEOUT)
        )
    )
    assert got == grpc.StatusCode.FAILED_PRECONDITION
    assert "job statistics" in details
    for tune in (
        pb.TuneMigrationRequest(domain_uuid=WEB.uuid, max_downtime_ms=1000),
        pb.TuneMigrationRequest(domain_uuid=WEB.uuid, start_postcopy=True),
        pb.TuneMigrationRequest(domain_uuid=WEB.uuid, abort=True),
    ):
        got, details = _code(lambda t=tune: stub.TuneMigration(t, timeout=TIMEOUT))
        assert got == grpc.StatusCode.FAILED_PRECONDITION, details


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        (pb.TuneMigrationRequest(domain_uuid=WEB.uuid), "no change"),
        (pb.TuneMigrationRequest(domain_uuid="x", abort=True), "UUID"),
        (pb.TuneMigrationRequest(domain_uuid=WEB.uuid, vcpu_throttle_pct=100), "between 0 and 99"),
        (
            pb.TuneMigrationRequest(domain_uuid=WEB.uuid, abort=True, start_postcopy=True),
            "cannot be combined",
        ),
        (pb.WatchMigrationRequest(domain_uuid=WEB.uuid, interval_s=-1), "negative"),
        (pb.MigrateRequest(domain_uuid=WEB.uuid, destination_uri="http://evil/"), "qemu"),
        (
            pb.MigrateRequest(
                domain_uuid=WEB.uuid,
                destination_uri="qemu+tcp://other/system",
                options=pb.MigrateOptions(migration_uri="file:///etc/passwd"),
            ),
            "tcp://",
        ),
        (pb.CheckCpuCompatibilityRequest(), "cpu"),
        (pb.CheckCpuCompatibilityRequest(cpu=pb.CpuDefinition(xml="<domain/>")), "<cpu>"),
    ],
)
def test_bad_input_is_invalid_argument(
    stub: agent_pb2_grpc.HostAgentStub, request_: object, words: str
) -> None:
    calls = {
        pb.TuneMigrationRequest: stub.TuneMigration,
        pb.WatchMigrationRequest: lambda r, timeout: list(stub.WatchMigration(r, timeout=timeout)),
        pb.MigrateRequest: stub.Migrate,
        pb.CheckCpuCompatibilityRequest: stub.CheckCpuCompatibility,
    }
    call = calls[type(request_)]
    got, details = _code(lambda: call(request_, timeout=TIMEOUT))
    assert got == grpc.StatusCode.INVALID_ARGUMENT, details
    assert words in details


def test_migrate_refuses_a_domain_that_is_not_running(stub: agent_pb2_grpc.HostAgentStub) -> None:
    request = pb.MigrateRequest(domain_uuid=STOPPED.uuid, destination_uri="qemu+tcp://b/system")
    got, details = _code(lambda: stub.Migrate(request, timeout=TIMEOUT))
    assert got == grpc.StatusCode.FAILED_PRECONDITION
    assert "shutoff" in details


def test_vcpu_throttle_of_a_stopped_domain_is_refused(stub: agent_pb2_grpc.HostAgentStub) -> None:
    request = pb.TuneMigrationRequest(domain_uuid=STOPPED.uuid, vcpu_throttle_pct=50)
    got, _ = _code(lambda: stub.TuneMigration(request, timeout=TIMEOUT))
    assert got == grpc.StatusCode.FAILED_PRECONDITION


def test_cpu_comparison_unsupported_by_test_driver(stub: agent_pb2_grpc.HostAgentStub) -> None:
    request = pb.CheckCpuCompatibilityRequest(cpu=pb.CpuDefinition(model="EPYC"))
    got, details = _code(lambda: stub.CheckCpuCompatibility(request, timeout=TIMEOUT))
    assert got == grpc.StatusCode.FAILED_PRECONDITION
    assert "compare CPU" in details


def test_bad_input_changes_nothing(stub: agent_pb2_grpc.HostAgentStub) -> None:
    before = stub.ListDomains(pb.ListDomainsRequest(), timeout=TIMEOUT)
    for request in (
        pb.TuneMigrationRequest(domain_uuid=WEB.uuid, vcpu_throttle_pct=100),
        pb.MigrateRequest(domain_uuid=WEB.uuid, destination_uri="http://evil/"),
    ):
        call = stub.TuneMigration if isinstance(request, pb.TuneMigrationRequest) else stub.Migrate
        with pytest.raises(grpc.RpcError):
            call(request, timeout=TIMEOUT)  # type: ignore[operator]
    after = stub.ListDomains(pb.ListDomainsRequest(), timeout=TIMEOUT)
    assert before == after
