"""Real daemons with mutual TLS, certificates from a throwaway CA (hostmaint.common.pki).

The fixtures and helpers of tests/security and tests/osc; a conftest imports
the fixtures it uses.
"""

from __future__ import annotations

import datetime
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
from hostmaint.common import daemon
from hostmaint.common.pki import CertFiles, CertificateAuthority
from hostmaint.coordinator.cmd import Coordinator
from hostmaint.protos import agent_pb2 as pb
from hostmaint.protos import agent_pb2_grpc
from tests.agent.conftest import DOMAINS
from tests.agent.nodexml import write_node
from tests.coordinator.conftest import libvirt_coordinator_config

T = 10
COORDINATOR_ID = "coordinator.example"  # a DNS SAN of the coordinator's client certificate
PEER_URI = "qemu+tls://host2.example/system"
LAB_URIS = "qemu+unix:///system?socket=/run/hm-sec/*/libvirt-sock"
MIGRATION_NET = "10.9.0.0/24"


@dataclass(frozen=True)
class Pki:
    agent_server: CertFiles
    coordinator_server: CertFiles
    coordinator: CertFiles  # the identity agents allow
    operator: CertFiles  # same CA, another identity
    expired: CertFiles  # the right identity, expired
    foreign: CertFiles  # the right identity, from another CA


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    now = datetime.datetime.now(datetime.UTC)
    ca = CertificateAuthority(tmp_path_factory.mktemp("pki"), now=now)
    other = CertificateAuthority(tmp_path_factory.mktemp("other-pki"), now=now)
    past = now - datetime.timedelta(days=30)
    return Pki(
        agent_server=ca.server("agent"),
        coordinator_server=ca.server("coordinator-server"),
        coordinator=ca.client("coordinator", "hostmaint-coordinator", dns_names=[COORDINATOR_ID]),
        operator=ca.client("operator", "operator"),
        expired=ca.client(
            "expired",
            COORDINATOR_ID,
            not_before=past,
            not_after=past + datetime.timedelta(days=1),
        ),
        foreign=other.client("foreign", COORDINATOR_ID),
    )


def tls_of(files: CertFiles) -> daemon.TlsFiles:
    return daemon.TlsFiles(str(files.cert_file), str(files.key_file), str(files.ca_file))


@contextmanager
def agent_stub(
    port: int, client: CertFiles | None, ca_file: Path | None = None
) -> Iterator[agent_pb2_grpc.HostAgentStub]:
    """A stub over mutual TLS with `client`'s certificate; plaintext when None.

    With `ca_file` and no client certificate: TLS that trusts the server but shows no
    certificate of its own.
    """
    address = f"127.0.0.1:{port}"
    if client is not None:
        channel = daemon.channel(address, tls_of(client))
    elif ca_file is not None:
        channel = grpc.secure_channel(
            address, grpc.ssl_channel_credentials(root_certificates=ca_file.read_bytes())
        )
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        yield agent_pb2_grpc.HostAgentStub(channel)


def agent_conf(node: Path, **grpc_opts: object) -> cfg.ConfigOpts:
    conf = agent_config([])
    conf.set_override("uri", f"test://{node}", group="libvirt")
    conf.set_override("listen", "127.0.0.1:0", group="grpc")
    conf.set_override("enabled", False, group="dirty_rate")
    conf.set_override("grace_s", 0.5, group="grpc")
    conf.set_override("allowed_destinations", [PEER_URI, LAB_URIS], group="migration")
    conf.set_override("allowed_migration_hosts", [MIGRATION_NET], group="migration")
    for key, value in grpc_opts.items():
        conf.set_override(key, value, group="grpc")
    return conf


def start_agent(conf: cfg.ConfigOpts) -> Agent:
    agent = Agent(conf, threading.Event())
    agent.driver.connect()
    agent.start()
    return agent


@pytest.fixture
def node(tmp_path: Path) -> Path:
    return write_node(tmp_path / "node.xml", DOMAINS)


@pytest.fixture
def tls_agent(node: Path, pki: Pki) -> Iterator[Agent]:
    """An agent that requires client certificates and lets only COORDINATOR_ID change domains."""
    files = pki.agent_server
    agent = start_agent(
        agent_conf(
            node,
            cert_file=str(files.cert_file),
            key_file=str(files.key_file),
            ca_file=str(files.ca_file),
            allowed_coordinators=[COORDINATOR_ID],
        )
    )
    yield agent
    agent.stop()


@pytest.fixture
def plaintext_agent(node: Path) -> Iterator[Agent]:
    agent = start_agent(agent_conf(node))
    yield agent
    agent.stop()


def domains(agent: Agent, client: CertFiles | None) -> list[pb.Domain]:
    """Every domain as the agent reports it: the state a refused call must leave alone."""
    with agent_stub(agent.port, client) as stub:
        return list(stub.ListDomains(pb.ListDomainsRequest(), timeout=T).domains)


@dataclass
class TlsCluster:
    agents: dict[str, Agent]
    coordinator: Coordinator


@pytest.fixture
def tls_cluster(tmp_path: Path, pki: Pki, request: pytest.FixtureRequest) -> Iterator[TlsCluster]:
    """Two TLS agents and a coordinator reaching them with its client certificate.

    Parametrize indirectly with "operator" to give the coordinator a certificate
    whose identity the agents do not allow.
    """
    identity = getattr(request, "param", "coordinator")
    agents: dict[str, Agent] = {}
    try:
        for name, doms in (("host1", DOMAINS), ("host2", [])):
            files = pki.agent_server
            agents[name] = start_agent(
                agent_conf(
                    write_node(tmp_path / f"{name}.xml", doms),
                    cert_file=str(files.cert_file),
                    key_file=str(files.key_file),
                    ca_file=str(files.ca_file),
                    allowed_coordinators=[COORDINATOR_ID],
                )
            )
        conf = libvirt_coordinator_config(tmp_path, agents)
        server, client = pki.coordinator_server, getattr(pki, identity)
        for group, files in (("grpc", server), ("agents", client)):
            conf.set_override("cert_file", str(files.cert_file), group=group)
            conf.set_override("key_file", str(files.key_file), group=group)
            conf.set_override("ca_file", str(files.ca_file), group=group)
        coordinator = Coordinator(conf, threading.Event())
        coordinator.start()
        try:
            yield TlsCluster(agents, coordinator)
        finally:
            coordinator.stop()
    finally:
        for a in agents.values():
            a.stop()
