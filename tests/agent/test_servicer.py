"""The servicer's translation, without a network (grpc_testing)."""

from __future__ import annotations

import inspect
import time

import grpc
import grpc_testing
import pytest

from hostmaint.agent import errors
from hostmaint.agent.cmd import Agent
from hostmaint.agent.servicer import STATUS_CODES, HostAgentServicer
from hostmaint.protos import agent_pb2 as pb
from tests.agent.conftest import GPU

SERVICE = pb.DESCRIPTOR.services_by_name["HostAgent"]


def test_every_error_has_a_status_code() -> None:
    classes = [
        c
        for _, c in inspect.getmembers(errors, inspect.isclass)
        if issubclass(c, errors.AgentError) and c is not errors.AgentError
    ]
    assert sorted(c.__name__ for c in classes) == sorted(c.__name__ for c in STATUS_CODES)


@pytest.fixture
def server(agent: Agent) -> grpc_testing.Server:
    servicer = HostAgentServicer(agent.service, clock=time.time)
    return grpc_testing.server_from_dictionary({SERVICE: servicer}, grpc_testing.strict_real_time())


def _unary(
    server: grpc_testing.Server, method: str, request: object
) -> tuple[object, grpc.StatusCode, str]:
    rpc = server.invoke_unary_unary(SERVICE.methods_by_name[method], (), request, None)
    response, _, code, details = rpc.termination()
    return response, code, details


def test_list_domains_translates(server: grpc_testing.Server) -> None:
    response, code, _ = _unary(
        server, "ListDomains", pb.ListDomainsRequest(domain_uuids=[GPU.uuid])
    )
    assert code == grpc.StatusCode.OK
    assert [d.name for d in response.domains] == [GPU.name]  # type: ignore[attr-defined]


def test_errors_become_status_codes(server: grpc_testing.Server) -> None:
    _, code, details = _unary(server, "ListDomains", pb.ListDomainsRequest(domain_uuids=["1"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "domain_uuid" in details
    _, code, details = _unary(
        server,
        "TuneMigration",
        pb.TuneMigrationRequest(domain_uuid=GPU.uuid, max_downtime_ms=500),
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
