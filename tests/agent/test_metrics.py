"""The agent's Prometheus endpoint: scraped over HTTP from a running agent on a test:/// host."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest

from hostmaint.agent.cmd import Agent
from hostmaint.agent.metrics import AgentCollector
from hostmaint.agent.migrations import Sample
from hostmaint.agent.types import Domain, JobStats, MigrationPhase
from hostmaint.protos import agent_pb2 as pb
from hostmaint.protos import agent_pb2_grpc
from tests.agent.conftest import DB, DOMAINS, WEB, started_agent
from tests.scrape import labelled, scrape, value


@pytest.fixture
def measured_agent(node_file: Path) -> Iterator[Agent]:
    agent = started_agent(node_file, metrics_listen="127.0.0.1:0")
    yield agent
    agent.stop()


def test_a_running_agent_serves_its_host_and_domains(measured_agent: Agent) -> None:
    assert measured_agent.metrics is not None
    series = scrape(measured_agent.metrics.port)
    assert value(series, "hostmaint_agent_libvirt_up") == 1.0
    assert value(series, "hostmaint_agent_domains", state="running") == 4.0
    assert value(series, "hostmaint_agent_domains", state="shutoff") == 1.0
    assert value(series, "hostmaint_agent_domains", state="paused") == 1.0
    assert (
        value(series, "hostmaint_agent_domain_memory_bytes", domain_uuid=DB.uuid, name=DB.name)
        == DB.memory_mib * 1024 * 1024
    )
    assert len(labelled(series, "hostmaint_agent_domain_memory_bytes")) == len(DOMAINS)
    # test:/// runs no migration and measures no dirty rate: no such series at all
    assert labelled(series, "hostmaint_agent_migration_phase") == []


def test_served_calls_are_counted_by_method_and_status(measured_agent: Agent) -> None:
    assert measured_agent.metrics is not None
    with grpc.insecure_channel(f"127.0.0.1:{measured_agent.port}") as channel:
        stub = agent_pb2_grpc.HostAgentStub(channel)
        stub.ListDomains(pb.ListDomainsRequest(), timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListDomains(pb.ListDomainsRequest(domain_uuids=["nope"]), timeout=10)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        unknown = "6f1c1a52-1b7e-4d0e-9d1a-0000000000ff"
        with pytest.raises(grpc.RpcError):
            list(stub.WatchMigration(pb.WatchMigrationRequest(domain_uuid=unknown), timeout=10))
    series = scrape(measured_agent.metrics.port)
    rpcs = "hostmaint_agent_rpcs_total"
    assert value(series, rpcs, method="ListDomains", code="OK") == 1.0
    assert value(series, rpcs, method="ListDomains", code="INVALID_ARGUMENT") == 1.0
    assert value(series, rpcs, method="WatchMigration", code="NOT_FOUND") == 1.0


def test_no_endpoint_unless_configured(node_file: Path) -> None:
    agent = started_agent(node_file)
    try:
        assert agent.metrics is None
    finally:
        agent.stop()


@dataclass
class _Tracker:
    samples: dict[str, Sample]

    def current(self, domain_uuid: str) -> Sample | None:
        return self.samples.get(domain_uuid)


@dataclass
class _Service:
    """The agent's service as the collector sees it: domains, and the jobs running."""

    listed: list[Domain]
    tracker: _Tracker

    def domains(self) -> list[Domain]:
        return self.listed


def test_a_running_migration_shows_its_phase_progress_and_downtime_limit(
    measured_agent: Agent,
) -> None:
    """test:/// runs no migration job: the real domains, with one marked migrating and its
    job sample given, go through the collector as the endpoint would read them."""
    web = next(d for d in measured_agent.service.domains() if d.uuid == WEB.uuid)
    stats = JobStats(
        phase=MigrationPhase.PRECOPY,
        active=True,
        iteration=3,
        memory_total_bytes=1000,
        memory_processed_bytes=250,
        memory_remaining_bytes=750,
        bandwidth_bytes_per_s=5e7,
        dirty_rate_bytes_per_s=1e7,
    )
    sample = Sample(
        stats, max_downtime_ms=1500, max_downtime_set_by="hostmaint", final=False, sampled_at=0.0
    )
    service = _Service([replace(web, migrating=True)], _Tracker({WEB.uuid: sample}))
    families = {f.name: f for f in AgentCollector(service).collect()}  # type: ignore[arg-type]
    phases = {
        s.labels["phase"]: s.value
        for s in families["hostmaint_agent_migration_phase"].samples
        if s.labels["domain_uuid"] == WEB.uuid
    }
    assert phases["precopy"] == 1.0 and sum(phases.values()) == 1.0
    progress = families["hostmaint_agent_migration_progress_ratio"].samples
    assert [(s.labels, s.value) for s in progress] == [({"domain_uuid": WEB.uuid}, 0.25)]
    downtime = families["hostmaint_agent_migration_max_downtime_seconds"].samples
    assert [(s.labels, s.value) for s in downtime] == [
        ({"domain_uuid": WEB.uuid, "set_by": "hostmaint"}, 1.5)
    ]
