from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from hostmaint.agent.cmd import Agent, load_config
from hostmaint.protos import agent_pb2_grpc
from tests.agent.nodexml import (
    PAUSED,
    SHUTOFF,
    NovaMeta,
    TestDomain,
    cdrom,
    file_disk,
    pci_hostdev,
    rbd_disk,
    usb_hostdev,
    write_node,
)

WEB = TestDomain(
    name="instance-00000001",
    uuid="6f1c1a52-1b7e-4d0e-9d1a-000000000001",
    memory_mib=2048,
    current_mib=1536,
    vcpus=2,
    nova=NovaMeta("web-1", "m1.small", "5d0b4a9f6a0b4c59a4f1b0c1d2e3f405", "0a1b2c3d"),
    cpu_model="EPYC",
    cpu_features=(("svm", "disable"), ("x2apic", "require")),
    disks=(
        rbd_disk("vda", "vms/web-1_disk"),
        cdrom("hda", "/var/lib/nova/instances/w/disk.config"),
    ),
)
DB = TestDomain(
    name="instance-00000002",
    uuid="6f1c1a52-1b7e-4d0e-9d1a-000000000002",
    memory_mib=16384,
    vcpus=8,
    nova=NovaMeta("db-1", "m1.xlarge", "5d0b4a9f6a0b4c59a4f1b0c1d2e3f405", "0a1b2c3d"),
    disks=(file_disk("vda", "/var/lib/nova/instances/db/disk"),),
)
GPU = TestDomain(
    name="instance-00000003",
    uuid="6f1c1a52-1b7e-4d0e-9d1a-000000000003",
    memory_mib=8192,
    vcpus=4,
    nova=NovaMeta("gpu-1", "g1.large", "p2", "u2"),
    hostdevs=(pci_hostdev("3b", "00", "1"),),
)
DONGLE = TestDomain(
    name="licensed",
    uuid="6f1c1a52-1b7e-4d0e-9d1a-000000000004",
    memory_mib=512,
    hostdevs=(usb_hostdev("1234", "beef"),),
)
STOPPED = TestDomain(
    name="instance-00000005",
    uuid="6f1c1a52-1b7e-4d0e-9d1a-000000000005",
    memory_mib=1024,
    runstate=SHUTOFF,
    nova=NovaMeta("old-1", "m1.tiny", "p3", "u3"),
)
FROZEN = TestDomain(
    name="instance-00000006",
    uuid="6f1c1a52-1b7e-4d0e-9d1a-000000000006",
    memory_mib=4096,
    runstate=PAUSED,
)
DOMAINS = [WEB, DB, GPU, DONGLE, STOPPED, FROZEN]
BY_UUID = {d.uuid: d for d in DOMAINS}


@pytest.fixture
def node_file(tmp_path: Path) -> Path:
    return write_node(tmp_path / "node.xml", DOMAINS)


def started_agent(node_file: Path, grace_s: float = 1.0, metrics_listen: str = "") -> Agent:
    """An agent serving a test:/// host on a free loopback port, measuring nothing."""
    conf = load_config([])
    conf.set_override("listen", metrics_listen, group="metrics")
    conf.set_override("uri", f"test://{node_file}", group="libvirt")
    conf.set_override("listen", "127.0.0.1:0", group="grpc")
    conf.set_override("enabled", False, group="dirty_rate")
    conf.set_override("grace_s", grace_s, group="grpc")
    agent = Agent(conf, threading.Event())
    agent.driver.connect()
    agent.start()
    return agent


@pytest.fixture
def agent(node_file: Path) -> Iterator[Agent]:
    agent = started_agent(node_file)
    yield agent
    agent.stop()


@pytest.fixture
def stub(agent: Agent) -> Iterator[agent_pb2_grpc.HostAgentStub]:
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        yield agent_pb2_grpc.HostAgentStub(channel)
