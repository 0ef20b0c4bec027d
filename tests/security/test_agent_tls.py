"""The agent over real sockets with mutual TLS: who gets in, who may change domains."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hostmaint.agent.cmd import SERVICE_NAME, Agent
from hostmaint.common import daemon
from hostmaint.common.pki import CertFiles
from hostmaint.protos import agent_pb2 as pb
from hostmaint.protos import agent_pb2_grpc
from tests.agent.conftest import WEB
from tests.tlscluster import (
    PEER_URI,
    Pki,
    T,
    agent_conf,
    agent_stub,
    domains,
    start_agent,
    tls_of,
)

Call = Callable[[agent_pb2_grpc.HostAgentStub], object]
MIGRATE: Call = lambda s: s.Migrate(  # noqa: E731
    pb.MigrateRequest(domain_uuid=WEB.uuid, destination_uri=PEER_URI), timeout=T
)
TUNE: Call = lambda s: s.TuneMigration(  # noqa: E731
    pb.TuneMigrationRequest(domain_uuid=WEB.uuid, max_downtime_ms=5000), timeout=T
)
THROTTLE: Call = lambda s: s.TuneMigration(  # noqa: E731
    pb.TuneMigrationRequest(domain_uuid=WEB.uuid, vcpu_throttle_pct=50), timeout=T
)
MUTATIONS = {"migrate": MIGRATE, "tune": TUNE, "throttle": THROTTLE}


def status(call: Call, stub: agent_pb2_grpc.HostAgentStub) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(stub)
    return info.value.code(), info.value.details()  # type: ignore[attr-defined]


@pytest.mark.parametrize("who", ["no-certificate", "plaintext", "foreign-ca", "expired"])
def test_a_client_without_a_valid_certificate_is_refused(
    tls_agent: Agent, pki: Pki, who: str
) -> None:
    before = domains(tls_agent, pki.coordinator)
    client: CertFiles | None = {"foreign-ca": pki.foreign, "expired": pki.expired}.get(who)
    ca_file = pki.agent_server.ca_file if who == "no-certificate" else None
    with agent_stub(tls_agent.port, client, ca_file) as stub:
        for call in (*MUTATIONS.values(), lambda s: s.GetHost(pb.GetHostRequest(), timeout=T)):
            code, _ = status(call, stub)
            # The handshake fails: no call reaches the servicer.
            assert code == grpc.StatusCode.UNAVAILABLE
    assert domains(tls_agent, pki.coordinator) == before


def test_the_wrong_identity_reads_but_may_not_change(tls_agent: Agent, pki: Pki) -> None:
    before = domains(tls_agent, pki.coordinator)
    with agent_stub(tls_agent.port, pki.operator) as stub:
        host = stub.GetHost(pb.GetHostRequest(), timeout=T)
        assert host.domain_count == len(before)
        listed = stub.ListDomains(pb.ListDomainsRequest(domain_uuids=[WEB.uuid]), timeout=T)
        assert [d.uuid for d in listed.domains] == [WEB.uuid]
        for name, call in MUTATIONS.items():
            code, details = status(call, stub)
            assert code == grpc.StatusCode.PERMISSION_DENIED, name
            assert "operator" in details
    assert domains(tls_agent, pki.coordinator) == before


def test_health_is_open_to_any_certificate_of_the_ca(tls_agent: Agent, pki: Pki) -> None:
    with daemon.channel(f"127.0.0.1:{tls_agent.port}", tls_of(pki.operator)) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=T
        )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_the_allowed_identity_reaches_the_domain(tls_agent: Agent, pki: Pki) -> None:
    """Past authorisation the hypervisor answers: test:/// has no migration job to tune."""
    before = domains(tls_agent, pki.coordinator)
    with agent_stub(tls_agent.port, pki.coordinator) as stub:
        code, details = status(TUNE, stub)
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        code, details = status(THROTTLE, stub)
        assert code not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE)
        assert "vcpu" in details.lower()
    assert domains(tls_agent, pki.coordinator) == before


def test_plaintext_mutations_on_loopback(plaintext_agent: Agent) -> None:
    """Without TLS on loopback the default (plaintext_mutations = loopback) lets local callers in."""
    with agent_stub(plaintext_agent.port, None) as stub:
        code, details = status(TUNE, stub)
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details


def test_plaintext_mutations_never(node: Path) -> None:
    agent = start_agent(agent_conf(node, plaintext_mutations="never"))
    try:
        before = domains(agent, None)
        with agent_stub(agent.port, None) as stub:
            for name, call in MUTATIONS.items():
                code, details = status(call, stub)
                assert code == grpc.StatusCode.PERMISSION_DENIED, name
                assert "client certificate" in details
            assert stub.GetHost(pb.GetHostRequest(), timeout=T).domain_count == len(before)
        assert domains(agent, None) == before
    finally:
        agent.stop()
