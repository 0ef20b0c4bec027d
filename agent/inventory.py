"""Pure parsing of libvirt XML and the migration-blocker decision.

Inputs are XML strings and plain values; outputs are the typed values of
`agent.types`. Nothing here talks to libvirt.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable

from hostmaint.agent.types import (
    Blocker,
    BlockerKind,
    CpuDefinition,
    CpuFeature,
    Disk,
    DomainConfig,
    DomainState,
    HostDevice,
    NovaInstance,
)

NOVA_NS = "http://openstack.org/xmlns/libvirt/nova/1.1"
_UNITS = {
    "b": 1,
    "bytes": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}
# Disk sources both hosts reach: network protocols, and block devices (Nova
# attaches Cinder volumes as block devices).
_SHARED_SOURCE_TYPES = frozenset({"network", "volume", "block"})
_NOT_RUNNING = {
    DomainState.PAUSED: "the domain is paused",
    DomainState.SHUTOFF: "the domain is shut off",
    DomainState.SHUTDOWN: "the domain is shutting down",
    DomainState.CRASHED: "the domain has crashed",
    DomainState.PMSUSPENDED: "the domain is suspended by the guest",
    DomainState.UNKNOWN: "the domain's state is unknown",
}


def memory_bytes(element: ET.Element | None) -> int:
    """A libvirt <memory unit='KiB'>N</memory>-style element in bytes (KiB by default)."""
    if element is None or not (element.text or "").strip():
        return 0
    unit = element.get("unit", "KiB").lower()
    if unit not in _UNITS:
        raise ValueError(f"unknown memory unit {unit!r}")
    return int(element.text.strip()) * _UNITS[unit]  # type: ignore[union-attr]


def parse_cpu(element: ET.Element | None) -> CpuDefinition:
    """A <cpu> element of a domain or of the host capabilities."""
    if element is None:
        return CpuDefinition()
    features = tuple(
        CpuFeature(name=f.get("name", ""), policy=f.get("policy", ""))
        for f in element.findall("feature")
        if f.get("name")
    )
    model = element.find("model")
    return CpuDefinition(
        mode=element.get("mode", "custom" if model is not None else ""),
        model=(model.text or "").strip() if model is not None else "",
        vendor=(element.findtext("vendor") or "").strip(),
        arch=(element.findtext("arch") or "").strip(),
        features=features,
        xml=ET.tostring(element, encoding="unicode").strip(),
    )


def cpu_xml(cpu: CpuDefinition) -> str:
    """The <cpu> XML to hand libvirt for a definition (its own XML when it has one)."""
    if cpu.xml:
        return cpu.xml
    # A guest CPU: no <arch> (libvirt would read the XML as a host CPU and refuse `mode`).
    root = ET.Element("cpu")
    if cpu.mode:
        root.set("mode", cpu.mode)
    if cpu.model:
        ET.SubElement(root, "model").text = cpu.model
    if cpu.vendor:
        ET.SubElement(root, "vendor").text = cpu.vendor
    for f in cpu.features:
        attrs = {"name": f.name}
        if f.policy:
            attrs["policy"] = f.policy
        ET.SubElement(root, "feature", attrs)
    return ET.tostring(root, encoding="unicode")


def parse_host_cpu(capabilities_xml: str) -> tuple[CpuDefinition, str]:
    """The host CPU and the host uuid from `virConnectGetCapabilities` XML."""
    root = ET.fromstring(capabilities_xml)
    host = root.find("host")
    if host is None:
        return CpuDefinition(), ""
    return parse_cpu(host.find("cpu")), (host.findtext("uuid") or "").strip()


def _nova(metadata: ET.Element | None, domain_uuid: str) -> NovaInstance | None:
    if metadata is None:
        return None
    inst = metadata.find(f"{{{NOVA_NS}}}instance")
    if inst is None:
        return None
    flavor = inst.find(f"{{{NOVA_NS}}}flavor")
    owner = inst.find(f"{{{NOVA_NS}}}owner")
    user = owner.find(f"{{{NOVA_NS}}}user") if owner is not None else None
    project = owner.find(f"{{{NOVA_NS}}}project") if owner is not None else None
    return NovaInstance(
        # Nova names its libvirt domains by instance: the domain uuid is the instance uuid.
        instance_uuid=domain_uuid,
        name=(inst.findtext(f"{{{NOVA_NS}}}name") or "").strip(),
        flavor_name=flavor.get("name", "") if flavor is not None else "",
        project_uuid=project.get("uuid", "") if project is not None else "",
        user_uuid=user.get("uuid", "") if user is not None else "",
    )


def _disk(element: ET.Element, is_shared_path: Callable[[str], bool]) -> Disk:
    source_type = element.get("type", "file")
    source_el = element.find("source")
    source = ""
    if source_el is not None:
        source = (
            source_el.get("file")
            or source_el.get("dev")
            or source_el.get("name")
            or source_el.get("volume")
            or ""
        )
        if source_type == "network" and source_el.get("protocol"):
            source = f"{source_el.get('protocol')}:{source}"
    target = element.find("target")
    shared = source_type in _SHARED_SOURCE_TYPES or (
        source_type in ("file", "dir") and bool(source) and is_shared_path(source)
    )
    if element.find("shareable") is not None:
        shared = True
    return Disk(
        target=target.get("dev", "") if target is not None else "",
        device=element.get("device", "disk"),
        source_type=source_type,
        source=source,
        shared=shared,
        readonly=element.find("readonly") is not None,
    )


def _host_devices(devices: ET.Element | None) -> tuple[HostDevice, ...]:
    if devices is None:
        return ()
    found = []
    for hd in devices.findall("hostdev"):
        kind = hd.get("type", "unknown")
        vendor, product = hd.find("source/vendor"), hd.find("source/product")
        if vendor is not None and product is not None:
            address = f"{vendor.get('id', '?')}:{product.get('id', '?')}"
        else:
            address = _address(hd.find("source/address"))
        found.append(HostDevice(kind=kind, address=address))
    for iface in devices.findall("interface"):
        if iface.get("type") == "hostdev":
            addr = iface.find("source/address")
            found.append(HostDevice(kind="pci", address=_address(addr)))
    return tuple(found)


def _address(addr: ET.Element | None) -> str:
    if addr is None:
        return ""
    if addr.get("bus") is not None and addr.get("slot") is not None:
        return "{}:{}:{}.{}".format(
            addr.get("domain", "0x0000")[2:],
            addr.get("bus", "0x00")[2:],
            addr.get("slot", "0x00")[2:],
            addr.get("function", "0x0")[2:],
        )
    return ",".join(f"{k}={v}" for k, v in sorted(addr.attrib.items()))


def parse_domain_xml(
    xml: str, is_shared_path: Callable[[str], bool] = lambda _path: False
) -> DomainConfig:
    """A domain's XML (`virDomainGetXMLDesc`) as a DomainConfig."""
    root = ET.fromstring(xml)
    uuid = (root.findtext("uuid") or "").strip()
    devices = root.find("devices")
    disks = tuple(
        _disk(d, is_shared_path)
        for d in (devices.findall("disk") if devices is not None else [])
        if d.get("device", "disk") in ("disk", "lun", "cdrom", "floppy")
    )
    vcpu = root.find("vcpu")
    vcpus = int((vcpu.get("current") or vcpu.text or "1").strip()) if vcpu is not None else 1
    max_mem = memory_bytes(root.find("memory"))
    cur = root.find("currentMemory")
    dirty_ring = root.find("features/kvm/dirty-ring")
    return DomainConfig(
        uuid=uuid,
        name=(root.findtext("name") or "").strip(),
        memory_max_bytes=max_mem,
        memory_current_bytes=memory_bytes(cur) if cur is not None else max_mem,
        vcpus=vcpus,
        cpu=parse_cpu(root.find("cpu")),
        disks=disks,
        host_devices=_host_devices(devices),
        nova=_nova(root.find("metadata"), uuid),
        dirty_ring=dirty_ring is not None and dirty_ring.get("state") == "on",
    )


def migration_blockers(
    config: DomainConfig, state: DomainState, migrating: bool
) -> tuple[Blocker, ...]:
    """What stops a live migration of this domain, hard blockers first."""
    found: list[Blocker] = []
    if state in _NOT_RUNNING:
        found.append(Blocker(BlockerKind.NOT_RUNNING, _NOT_RUNNING[state], hard=True))
    for dev in config.host_devices:
        if dev.kind == "pci":
            reason = f"PCI device {dev.address or '?'} is passed through to the guest"
            found.append(Blocker(BlockerKind.PCI_PASSTHROUGH, reason, hard=True))
        else:
            reason = f"{dev.kind} host device {dev.address or '?'} is attached"
            found.append(Blocker(BlockerKind.HOST_DEVICE, reason, hard=True))
    if migrating:
        found.append(
            Blocker(BlockerKind.MIGRATION_RUNNING, "a migration job runs already", hard=True)
        )
    local = _local_writable_disks(config.disks)
    if local:
        reason = "local disks need block migration: " + ", ".join(
            f"{d.target}={d.source}" for d in local
        )
        found.append(Blocker(BlockerKind.LOCAL_DISK, reason, hard=False))
    return tuple(found)


def _local_writable_disks(disks: Iterable[Disk]) -> list[Disk]:
    return [d for d in disks if not d.shared and d.source and d.device != "cdrom"]
