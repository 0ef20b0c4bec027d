"""Every agent RPC refuses malformed input with INVALID_ARGUMENT and changes nothing.

Calls are made as the allowed coordinator over mutual TLS, so what refuses them is
validation, not authorisation.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from hostmaint.agent import errors
from hostmaint.agent.cmd import Agent
from hostmaint.agent.service import (
    DestinationPolicy,
    check_destination_uri,
    check_migration_uri,
)
from hostmaint.protos import agent_pb2 as pb
from hostmaint.protos import agent_pb2_grpc
from tests.agent.conftest import WEB
from tests.tlscluster import LAB_URIS, MIGRATION_NET, PEER_URI, Pki, T, agent_stub, domains

Stub = agent_pb2_grpc.HostAgentStub
LONG = "x" * 5000
NAN = float("nan")


def _migrate(dest: str, migration_uri: str = "", **options: int) -> Callable[[Stub], object]:
    request = pb.MigrateRequest(
        domain_uuid=WEB.uuid,
        destination_uri=dest,
        options=pb.MigrateOptions(migration_uri=migration_uri, **options),
    )
    return lambda s: s.Migrate(request, timeout=T)


def _refused(agent: Agent, pki: Pki, call: Callable[[Stub], object], words: str) -> None:
    before = domains(agent, pki.coordinator)
    with agent_stub(agent.port, pki.coordinator) as stub, pytest.raises(grpc.RpcError) as info:
        call(stub)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()  # type: ignore[attr-defined]
    assert words in err.details()  # type: ignore[attr-defined]
    assert domains(agent, pki.coordinator) == before


@pytest.mark.parametrize(
    ("dest", "migration_uri", "words"),
    [
        ("file:///etc/passwd", "", "qemu libvirt URI"),
        ("unix:///run/libvirt/libvirt-sock", "", "qemu libvirt URI"),
        ("qemu+ext:///system?command=/bin/sh", "", "qemu libvirt URI"),
        ("qemu+tcp://evil.example/system", "", "not an allowed destination"),
        ("qemu+tls://host2.example/session", "", "not an allowed destination"),
        ("qemu+ssh://host2.example/system?command=/bin/sh", "", "parameters not allowed"),
        ("qemu+tls://host2.example/system?no_verify=1", "", "parameters not allowed"),
        ("qemu+tls://root@host2.example/system", "", "user"),
        ("qemu+unix:///system?socket=/tmp/evil-sock", "", "not an allowed destination"),
        (PEER_URI, "file:///tmp/guest-memory", "tcp://host[:port]"),
        (PEER_URI, "unix:///tmp/sock", "tcp://host[:port]"),
        (PEER_URI, "rdma://10.9.0.2", "tcp://host[:port]"),
        (PEER_URI, "tcp://10.9.0.2:99999", "port"),
        (PEER_URI, "tcp://evil.example:4444", "not an allowed migration host"),
        (PEER_URI, "tcp://10.9.1.2", "not an allowed migration host"),
        (PEER_URI, "tcp://10.9.0.2/x?y", "tcp://host[:port]"),
        (PEER_URI + "/" + LONG, "", "printable"),
    ],
)
def test_migration_to_a_disallowed_place_is_refused(
    tls_agent: Agent, pki: Pki, dest: str, migration_uri: str, words: str
) -> None:
    _refused(tls_agent, pki, _migrate(dest, migration_uri), words)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"max_downtime_ms": 2_000_001}, "max_downtime_ms"),
        ({"bandwidth_bytes_per_s": 1 << 50}, "bandwidth_bytes_per_s"),
        ({"parallel_connections": 256}, "parallel_connections"),
        ({"auto_converge_initial_pct": 101}, "auto_converge_initial_pct"),
        ({"auto_converge_increment_pct": 1000}, "auto_converge_increment_pct"),
    ],
)
def test_migration_numbers_out_of_range(
    tls_agent: Agent, pki: Pki, options: dict[str, int], words: str
) -> None:
    _refused(tls_agent, pki, _migrate(PEER_URI, "tcp://10.9.0.2", **options), words)


BAD_UUIDS = ["", "x", "6f1c1a52-1b7e-4d0e-9d1a-00000000000g", WEB.uuid + "0", LONG]


@pytest.mark.parametrize("uuid", BAD_UUIDS)
def test_bad_uuids_are_refused_everywhere(tls_agent: Agent, pki: Pki, uuid: str) -> None:
    calls: list[Callable[[Stub], object]] = [
        lambda s: s.ListDomains(pb.ListDomainsRequest(domain_uuids=[uuid]), timeout=T),
        lambda s: s.MeasureDirtyRate(pb.MeasureDirtyRateRequest(domain_uuids=[uuid]), timeout=T),
        lambda s: list(s.WatchMigration(pb.WatchMigrationRequest(domain_uuid=uuid), timeout=T)),
        lambda s: s.TuneMigration(
            pb.TuneMigrationRequest(domain_uuid=uuid, max_downtime_ms=1000), timeout=T
        ),
        lambda s: s.Migrate(
            pb.MigrateRequest(domain_uuid=uuid, destination_uri=PEER_URI), timeout=T
        ),
    ]
    for call in calls:
        _refused(tls_agent, pki, call, "UUID")


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (
            lambda s: s.ListDomains(
                pb.ListDomainsRequest(domain_uuids=[WEB.uuid] * 4097), timeout=T
            ),
            "at most 4096",
        ),
        (
            lambda s: s.MeasureDirtyRate(pb.MeasureDirtyRateRequest(window_s=NAN), timeout=T),
            "window_s",
        ),
        (
            lambda s: s.MeasureDirtyRate(pb.MeasureDirtyRateRequest(window_s=61), timeout=T),
            "window_s",
        ),
        (
            lambda s: s.MeasureDirtyRate(pb.MeasureDirtyRateRequest(method=99), timeout=T),  # type: ignore[arg-type]
            "method",
        ),
        (
            lambda s: list(
                s.WatchMigration(
                    pb.WatchMigrationRequest(domain_uuid=WEB.uuid, interval_s=NAN), timeout=T
                )
            ),
            "numbers",
        ),
        (
            lambda s: list(
                s.WatchMigration(
                    pb.WatchMigrationRequest(domain_uuid=WEB.uuid, start_timeout_s=1e9), timeout=T
                )
            ),
            "start_timeout_s",
        ),
        (
            lambda s: s.TuneMigration(
                pb.TuneMigrationRequest(domain_uuid=WEB.uuid, max_downtime_ms=3_000_000), timeout=T
            ),
            "max_downtime_ms",
        ),
        (
            lambda s: s.TuneMigration(
                pb.TuneMigrationRequest(domain_uuid=WEB.uuid, max_downtime_ms=0), timeout=T
            ),
            "max_downtime_ms",
        ),
        (
            lambda s: s.TuneMigration(
                pb.TuneMigrationRequest(domain_uuid=WEB.uuid, bandwidth_bytes_per_s=1 << 60),
                timeout=T,
            ),
            "bandwidth_bytes_per_s",
        ),
        (
            lambda s: s.TuneMigration(
                pb.TuneMigrationRequest(
                    domain_uuid=WEB.uuid, bandwidth_bytes_per_s=0, lower_max_downtime=True
                ),
                timeout=T,
            ),
            "lower_max_downtime",
        ),
        (
            lambda s: s.CheckCpuCompatibility(
                pb.CheckCpuCompatibilityRequest(cpu=pb.CpuDefinition(model=LONG)), timeout=T
            ),
            "cpu.model",
        ),
        (
            lambda s: s.CheckCpuCompatibility(
                pb.CheckCpuCompatibilityRequest(cpu=pb.CpuDefinition(model="EPYC\n<x/>")),
                timeout=T,
            ),
            "cpu.model",
        ),
        (
            lambda s: s.CheckCpuCompatibility(
                pb.CheckCpuCompatibilityRequest(
                    cpu=pb.CpuDefinition(
                        model="EPYC", features=[pb.CpuFeature(name="svm", policy="evil")]
                    )
                ),
                timeout=T,
            ),
            "policy",
        ),
        (
            lambda s: s.CheckCpuCompatibility(
                pb.CheckCpuCompatibilityRequest(
                    cpu=pb.CpuDefinition(xml="<cpu>" + " " * 70000 + "</cpu>")
                ),
                timeout=T,
            ),
            "cpu.xml",
        ),
    ],
)
def test_out_of_range_input_is_refused(
    tls_agent: Agent, pki: Pki, call: Callable[[Stub], object], words: str
) -> None:
    _refused(tls_agent, pki, call, words)


def test_allowed_destinations_pass_validation(tls_agent: Agent, pki: Pki) -> None:
    """Allowed places reach the hypervisor (test:/// cannot migrate), and nothing moved."""
    before = domains(tls_agent, pki.coordinator)
    for dest, migration_uri in (
        (PEER_URI, ""),
        (PEER_URI, "tcp://host2.example:49152"),
        (PEER_URI, "tcp://10.9.0.7"),
        ("qemu+unix:///system?socket=/run/hm-sec/h2/libvirt-sock", "tcp://10.9.0.3"),
    ):
        with agent_stub(tls_agent.port, pki.coordinator) as stub:
            with pytest.raises(grpc.RpcError) as info:
                _migrate(dest, migration_uri)(stub)
        err = info.value
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()  # type: ignore[attr-defined]
        assert "not supported" in err.details()  # type: ignore[attr-defined]
    assert domains(tls_agent, pki.coordinator) == before


def test_destination_policy_empty_refuses_everything() -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        DestinationPolicy(()).check(PEER_URI, "host2.example", "")
    assert "allowed_destinations" in str(info.value)


@pytest.mark.parametrize(
    ("migration_host", "allowed"),
    [
        ("host2.example", True),  # the destination's own host name
        ("HOST2.example", True),
        ("10.9.0.200", True),
        ("10.9.1.1", False),
        ("peer-7.lab", True),
        ("peer-7.lab.evil", False),
        ("::1", False),
    ],
)
def test_migration_hosts(migration_host: str, allowed: bool) -> None:
    policy = DestinationPolicy((PEER_URI, LAB_URIS), (MIGRATION_NET, "peer-*.lab"))
    dest_host = check_destination_uri(PEER_URI)
    if allowed:
        policy.check(PEER_URI, dest_host, migration_host)
    else:
        with pytest.raises(errors.InvalidArgument):
            policy.check(PEER_URI, dest_host, migration_host)


def test_uri_parsing() -> None:
    assert check_destination_uri("qemu+tcp://h1:16509/system") == "h1"
    assert check_destination_uri("qemu+unix:///system?socket=/s") == ""
    assert check_migration_uri("tcp://[fe80::1]:49152") == "fe80::1"
    assert check_migration_uri("tcp://10.0.0.2") == "10.0.0.2"


def test_a_question_mark_in_an_exact_destination_is_literal() -> None:
    exact = "qemu+unix:///system?socket=/run/h1/libvirt-sock"
    policy = DestinationPolicy((exact,))
    policy.check(exact, "", "")
    with pytest.raises(errors.InvalidArgument):
        policy.check("qemu+unix:///systemXsocket=/run/h1/libvirt-sock", "", "")
