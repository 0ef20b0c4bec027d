from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from oslo_config import cfg

from hostmaint.agent.cmd import Agent
from hostmaint.agent.cmd import load_config as agent_config
from hostmaint.coordinator.cmd import Coordinator
from hostmaint.coordinator.cmd import load_config as coordinator_config
from hostmaint.protos import coordinator_pb2_grpc
from tests.agent.conftest import DOMAINS
from tests.agent.nodexml import write_node
from tests.coordinator.pgcluster import BIN_GLOB, SERVER_USER, PostgresCluster, find_bindir


def start_agent(node: Path) -> Agent:
    conf = agent_config([])
    conf.set_override("uri", f"test://{node}", group="libvirt")
    conf.set_override("listen", "127.0.0.1:0", group="grpc")
    conf.set_override("enabled", False, group="dirty_rate")
    conf.set_override("grace_s", 0.5, group="grpc")
    agent = Agent(conf, threading.Event())
    agent.driver.connect()
    agent.start()
    return agent


def libvirt_coordinator_config(tmp_path: Path, agents: dict[str, Agent]) -> cfg.ConfigOpts:
    """A coordinator on loopback with the libvirt driver over these test:/// agents."""
    conf = coordinator_config([])
    conf.set_override("listen", "127.0.0.1:0", group="grpc")
    conf.set_override("grace_s", 0.5, group="grpc")
    conf.set_override("url", f"sqlite:///{tmp_path / 'coordinator.db'}", group="database")
    conf.set_override("name", "libvirt", group="driver")
    conf.set_override(
        "hosts", {h: f"127.0.0.1:{a.port}" for h, a in agents.items()}, group="agents"
    )
    conf.set_override("uris", {h: f"test:///{h}" for h in agents}, group="libvirt_driver")
    conf.set_override("timeout_s", 5.0, group="agents")
    conf.set_override("poll_interval_s", 0.1, group="drain")
    conf.set_override("link_bandwidth_bytes_per_s", 1.25e9, group="drain")
    return conf


@dataclass
class Cluster:
    agents: dict[str, Agent]
    coordinator: Coordinator
    stub: coordinator_pb2_grpc.CoordinatorStub


@contextmanager
def running_cluster(tmp_path: Path, metrics_listen: str = "") -> Iterator[Cluster]:
    """Two test:/// hosts with agents, and a coordinator with the libvirt driver."""
    agents = {
        "host1": start_agent(write_node(tmp_path / "host1.xml", DOMAINS)),
        "host2": start_agent(write_node(tmp_path / "host2.xml", [])),
    }
    conf = libvirt_coordinator_config(tmp_path, agents)
    conf.set_override("listen", metrics_listen, group="metrics")
    coordinator = Coordinator(conf, threading.Event())
    coordinator.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{coordinator.port}")
    try:
        yield Cluster(agents, coordinator, coordinator_pb2_grpc.CoordinatorStub(channel))
    finally:
        channel.close()
        coordinator.stop()
        for a in agents.values():
            a.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with running_cluster(tmp_path) as running:
        yield running


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL cluster for the session (unix socket only, no TCP)."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip(f"no PostgreSQL server under {BIN_GLOB} (Debian package postgresql)")
    try:
        cluster = PostgresCluster(bindir)
    except KeyError:
        pytest.skip(f"running as root and there is no {SERVER_USER!r} user to run PostgreSQL")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty journal database: a SQLite file, then a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'journal.db'}"
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return cluster.create_database()
