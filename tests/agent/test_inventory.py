"""Pure XML parsing and blocker decisions, from hand-written XML."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from hostmaint.agent import inventory
from hostmaint.agent.types import BlockerKind, CpuDefinition, CpuFeature, DomainState

DOMAIN = """
<domain type='kvm'>
  <name>instance-0000000a</name>
  <uuid>0d9c6d7e-5a4b-4f36-9f3c-6a3c1e2d4b5a</uuid>
  <memory unit='GiB'>4</memory>
  <currentMemory unit='KiB'>2097152</currentMemory>
  <vcpu current='2'>4</vcpu>
  <features><kvm><dirty-ring state='on' size='4096'/></kvm></features>
  <cpu mode='host-model' check='partial'/>
  <devices>
    <disk type='block' device='disk'><source dev='/dev/disk/by-path/ip-10.0.0.5-lun-1'/>
      <target dev='vdb' bus='virtio'/></disk>
    <disk type='file' device='disk'><source file='/srv/nfs/instances/a/disk'/>
      <target dev='vda' bus='virtio'/><shareable/></disk>
    <disk type='file' device='disk'><source file='/var/lib/nova/instances/a/disk.eph0'/>
      <target dev='vdc' bus='virtio'/></disk>
    <interface type='hostdev'><source><address type='pci' domain='0x0000' bus='0x5e'
      slot='0x10' function='0x2'/></source></interface>
  </devices>
</domain>
"""


def test_parse_domain_xml() -> None:
    config = inventory.parse_domain_xml(DOMAIN, lambda p: p.startswith("/srv/nfs/"))
    assert config.name == "instance-0000000a"
    assert config.memory_max_bytes == 4 * 1024**3
    assert config.memory_current_bytes == 2 * 1024**3
    assert config.vcpus == 2
    assert config.dirty_ring
    assert config.cpu.mode == "host-model"
    assert config.nova is None
    assert [(d.target, d.shared) for d in config.disks] == [
        ("vdb", True),
        ("vda", True),
        ("vdc", False),
    ]
    assert [(h.kind, h.address) for h in config.host_devices] == [("pci", "0000:5e:10.2")]


def test_blockers_order_and_hardness() -> None:
    config = inventory.parse_domain_xml(DOMAIN)
    blockers = inventory.migration_blockers(config, DomainState.PAUSED, migrating=True)
    assert [(b.kind, b.hard) for b in blockers] == [
        (BlockerKind.NOT_RUNNING, True),
        (BlockerKind.PCI_PASSTHROUGH, True),
        (BlockerKind.MIGRATION_RUNNING, True),
        (BlockerKind.LOCAL_DISK, False),
    ]
    assert "vdc=/var/lib/nova/instances/a/disk.eph0" in blockers[-1].reason
    assert "vda" not in blockers[-1].reason  # <shareable/>
    assert "vdb" not in blockers[-1].reason  # block devices are volumes


def test_running_domain_on_shared_storage_has_no_blockers() -> None:
    xml = DOMAIN.replace("<interface type='hostdev'>", "<interface type='bridge'>")
    config = inventory.parse_domain_xml(xml, lambda p: True)
    assert inventory.migration_blockers(config, DomainState.RUNNING, migrating=False) == ()


@pytest.mark.parametrize(
    ("element", "expected"),
    [
        ("<memory unit='MiB'>512</memory>", 512 * 1024**2),
        ("<memory>1024</memory>", 1024 * 1024),
        ("<memory unit='G'>2</memory>", 2 * 1024**3),
        ("<memory unit='GB'>2</memory>", 2 * 1000**3),
        ("<memory unit='b'>4096</memory>", 4096),
    ],
)
def test_memory_units(element: str, expected: int) -> None:
    assert inventory.memory_bytes(ET.fromstring(element)) == expected


def test_unknown_memory_unit_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown memory unit"):
        inventory.memory_bytes(ET.fromstring("<memory unit='parsec'>1</memory>"))


def test_cpu_xml_round_trip() -> None:
    cpu = CpuDefinition(
        mode="custom",
        model="EPYC",
        vendor="AMD",
        arch="x86_64",
        features=(CpuFeature("svm", "disable"), CpuFeature("avx2", "require")),
    )
    parsed = inventory.parse_cpu(ET.fromstring(inventory.cpu_xml(cpu)))
    assert (parsed.mode, parsed.model, parsed.vendor) == ("custom", "EPYC", "AMD")
    assert parsed.arch == ""  # a guest CPU carries no <arch>
    assert parsed.features == cpu.features


def test_host_capabilities() -> None:
    caps = """<capabilities><host><uuid>aa5b2d1c-0000-4000-8000-000000000001</uuid>
      <cpu><arch>x86_64</arch><model>EPYC-Rome</model><vendor>AMD</vendor>
      <feature name='x2apic'/><feature name='svm'/></cpu></host></capabilities>"""
    cpu, host_uuid = inventory.parse_host_cpu(caps)
    assert host_uuid == "aa5b2d1c-0000-4000-8000-000000000001"
    assert (cpu.arch, cpu.model, cpu.vendor) == ("x86_64", "EPYC-Rome", "AMD")
    assert [f.name for f in cpu.features] == ["x2apic", "svm"]
