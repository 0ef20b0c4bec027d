"""Node files for libvirt's embedded test:/// driver, written by the tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

NOVA_NS = "http://openstack.org/xmlns/libvirt/nova/1.1"
TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"
# libvirt's numbering: 1 running, 3 paused, 5 shut off.
RUNNING, PAUSED, SHUTOFF = 1, 3, 5


@dataclass(frozen=True)
class NovaMeta:
    name: str
    flavor: str
    project_uuid: str
    user_uuid: str


@dataclass(frozen=True)
class TestDomain:
    name: str
    uuid: str
    memory_mib: int
    current_mib: int | None = None
    vcpus: int = 1
    runstate: int = RUNNING
    nova: NovaMeta | None = None
    cpu_model: str = ""
    cpu_features: tuple[tuple[str, str], ...] = ()
    disks: tuple[str, ...] = field(default_factory=tuple)  # raw <disk> XML
    hostdevs: tuple[str, ...] = field(default_factory=tuple)  # raw <hostdev>/<interface> XML

    def xml(self) -> str:
        parts = [
            f"<domain type='test' xmlns:test='{TEST_NS}'>",
            f"<name>{self.name}</name><uuid>{self.uuid}</uuid>",
            f"<memory unit='MiB'>{self.memory_mib}</memory>",
        ]
        if self.current_mib is not None:
            parts.append(f"<currentMemory unit='MiB'>{self.current_mib}</currentMemory>")
        parts.append(f"<vcpu>{self.vcpus}</vcpu>")
        if self.nova is not None:
            n = self.nova
            parts.append(
                f"<metadata><nova:instance xmlns:nova='{NOVA_NS}'>"
                f"<nova:name>{n.name}</nova:name>"
                f"<nova:flavor name='{n.flavor}'><nova:memory>{self.memory_mib}</nova:memory>"
                "</nova:flavor>"
                f"<nova:owner><nova:user uuid='{n.user_uuid}'>u</nova:user>"
                f"<nova:project uuid='{n.project_uuid}'>p</nova:project></nova:owner>"
                "</nova:instance></metadata>"
            )
        parts.append("<os><type arch='x86_64'>hvm</type></os>")
        if self.cpu_model:
            feats = "".join(f"<feature policy='{p}' name='{n}'/>" for n, p in self.cpu_features)
            parts.append(
                f"<cpu mode='custom' match='exact'><model>{self.cpu_model}</model>{feats}</cpu>"
            )
        parts.append("<devices>" + "".join(self.disks) + "".join(self.hostdevs) + "</devices>")
        if self.runstate != RUNNING:
            parts.append(f"<test:runstate>{self.runstate}</test:runstate>")
        parts.append("</domain>")
        return "".join(parts)


def file_disk(target: str, path: str) -> str:
    return (
        f"<disk type='file' device='disk'><source file='{path}'/>"
        f"<target dev='{target}' bus='virtio'/></disk>"
    )


def rbd_disk(target: str, name: str) -> str:
    return (
        f"<disk type='network' device='disk'><source protocol='rbd' name='{name}'/>"
        f"<target dev='{target}' bus='virtio'/></disk>"
    )


def cdrom(target: str, path: str) -> str:
    return (
        f"<disk type='file' device='cdrom'><source file='{path}'/>"
        f"<target dev='{target}' bus='sata'/><readonly/></disk>"
    )


def pci_hostdev(bus: str, slot: str, function: str) -> str:
    return (
        "<hostdev mode='subsystem' type='pci' managed='yes'><source>"
        f"<address domain='0x0000' bus='0x{bus}' slot='0x{slot}' function='0x{function}'/>"
        "</source></hostdev>"
    )


def usb_hostdev(vendor: str, product: str) -> str:
    return (
        "<hostdev mode='subsystem' type='usb'><source>"
        f"<vendor id='0x{vendor}'/><product id='0x{product}'/></source></hostdev>"
    )


def write_node(path: Path, domains: list[TestDomain], memory_kib: int = 64 * 1024 * 1024) -> Path:
    cpu = (
        "<cpu><mhz>2000</mhz><model>x86_64</model><nodes>1</nodes><sockets>1</sockets>"
        "<cores>8</cores><threads>1</threads></cpu>"
    )
    body = "".join(d.xml() for d in domains)
    path.write_text(f"<node>{cpu}<memory>{memory_kib}</memory>{body}</node>")
    return path


def many_domains(count: int) -> list[TestDomain]:
    """A host of `count` Nova instances, for scale benchmarks."""
    return [
        TestDomain(
            name=f"instance-{i:08x}",
            uuid=f"{i:08x}-0000-4000-8000-{i:012x}",
            memory_mib=512 * (1 + i % 8),
            vcpus=1 + i % 4,
            nova=NovaMeta(f"vm-{i}", f"m1.f{i % 8}", "p" * 8, "u" * 8),
            cpu_model="EPYC",
            disks=(rbd_disk("vda", f"vms/{i}_disk"),),
        )
        for i in range(count)
    ]
