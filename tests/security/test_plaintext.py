"""Plaintext only where configured: the daemons' and the coordinator's rules, real sockets."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from hostmaint.agent.cmd import Agent
from hostmaint.common import daemon
from hostmaint.coordinator import errors
from hostmaint.coordinator.agents import AgentRegistry, Health
from hostmaint.coordinator.cmd import Coordinator
from hostmaint.coordinator.cmd import load_config as coordinator_config
from tests.tlscluster import Pki, agent_conf, domains, start_agent, tls_of


def test_agent_refuses_plaintext_off_loopback(node: Path) -> None:
    conf = agent_conf(node, listen="0.0.0.0:0")
    with pytest.raises(daemon.InsecureRefused) as info:
        Agent(conf, threading.Event())
    assert "[grpc] insecure = true" in str(info.value)


def test_agent_serves_plaintext_off_loopback_only_when_insecure(
    node: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent = start_agent(agent_conf(node, listen="0.0.0.0:0", insecure=True))
    try:
        assert any("INSECURE" in r.getMessage() for r in caplog.records)
        assert domains(agent, None)  # reachable on 127.0.0.1 through the wildcard bind
    finally:
        agent.stop()


def test_half_configured_tls_refuses_to_start(node: Path, pki: Pki) -> None:
    files = pki.agent_server
    for overrides in (
        {"cert_file": str(files.cert_file), "key_file": str(files.key_file)},
        {"cert_file": str(files.cert_file), "key_file": "", "ca_file": str(files.ca_file)},
        {
            "cert_file": str(files.cert_file),
            "key_file": str(files.key_file),
            "ca_file": "/nonexistent/ca.pem",
        },
    ):
        with pytest.raises(daemon.TlsConfigError):
            Agent(agent_conf(node, **overrides), threading.Event())


def test_coordinator_refuses_plaintext_off_loopback(tmp_path: Path) -> None:
    conf = coordinator_config([])
    conf.set_override("listen", "0.0.0.0:0", group="grpc")
    conf.set_override("url", f"sqlite:///{tmp_path / 'c.db'}", group="database")
    conf.set_override("name", "libvirt", group="driver")
    with pytest.raises(daemon.InsecureRefused):
        Coordinator(conf, threading.Event())


def test_coordinator_refuses_plaintext_to_a_remote_agent(tmp_path: Path) -> None:
    conf = coordinator_config([])
    conf.set_override("listen", "127.0.0.1:0", group="grpc")
    conf.set_override("url", f"sqlite:///{tmp_path / 'c.db'}", group="database")
    conf.set_override("name", "libvirt", group="driver")
    conf.set_override("hosts", {"host1": "192.0.2.10:7710"}, group="agents")
    with pytest.raises(daemon.InsecureRefused) as info:
        Coordinator(conf, threading.Event())
    assert "[agents] insecure" in str(info.value)


def test_discovered_remote_agent_without_tls_is_unreachable() -> None:
    registry = AgentRegistry(
        {},
        timeout_s=1.0,
        tls=None,
        clock=lambda: 0.0,
        discover=lambda: {"host9": "192.0.2.9:7710"},
    )
    status = registry.probe("host9")
    assert status.health == Health.UNREACHABLE
    assert "plaintext" in status.error
    with pytest.raises(errors.AgentUnavailable):
        registry.client("host9")
    allowed = AgentRegistry(
        {"host9": "192.0.2.9:7710"}, timeout_s=1.0, tls=None, clock=lambda: 0.0, insecure=True
    )
    assert allowed.client("host9").address == "192.0.2.9:7710"  # configured: no refusal
    allowed.close()


def test_tls_agents_need_no_insecure(pki: Pki) -> None:
    registry = AgentRegistry(
        {"host9": "192.0.2.9:7710"}, timeout_s=1.0, tls=tls_of(pki.coordinator), clock=lambda: 0.0
    )
    assert registry.client("host9").address == "192.0.2.9:7710"
    registry.close()
    partial = dataclasses.replace(tls_of(pki.coordinator), ca_file="")
    with pytest.raises(daemon.TlsConfigError):
        partial.check("[agents]")
