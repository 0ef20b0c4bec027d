"""Lab guests: their spec file, their domain XML, the choice of accelerator and CPU model.

A lab guest is a multiboot kernel booted directly (`<kernel>` + `<cmdline>`),
one vCPU, no disk or NIC, its serial port written to a file in the lab's
state directory (opened in append mode, so the log continues across
migrations: every lab host sees the same file).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from . import errors
from .guest import GuestSpec

MIN_MEMORY_MIB = 128
MAX_MEMORY_MIB = 2048
# The model that works on these machines (host-model and host-passthrough
# crash QEMU 7.2 here); it is used only when libvirt reports it usable.
PREFERRED_CPU_MODEL = "EPYC"
KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
# Nova's libvirt driver writes its instance metadata in this namespace; the agent reads it.
NOVA_NS = "http://openstack.org/xmlns/libvirt/nova/1.1"
ET.register_namespace("nova", NOVA_NS)


class Accel(str, Enum):
    KVM = "kvm"
    TCG = "tcg"

    @property
    def domain_type(self) -> str:
        return "kvm" if self is Accel.KVM else "qemu"


def detect_accel(dev: Path = Path("/dev/kvm")) -> tuple[Accel, str]:
    """KVM when /dev/kvm opens and speaks the stable API, TCG otherwise; with the reason."""
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return Accel.TCG, f"{dev}: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        return Accel.TCG, f"{dev}: KVM_GET_API_VERSION failed: {exc.strerror}"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return Accel.TCG, f"{dev}: KVM API version {version}, expected {KVM_API_VERSION}"
    return Accel.KVM, f"{dev} works (KVM API {version})"


def usable_cpu_models(domcaps_xml: str) -> set[str]:
    """Named CPU models that libvirt's domain capabilities mark usable on this host."""
    root = ET.fromstring(domcaps_xml)
    models = set()
    for mode in root.iterfind("./cpu/mode[@name='custom']"):
        if mode.get("supported") != "yes":
            continue
        for model in mode.iterfind("model"):
            if model.get("usable") == "yes" and model.text:
                models.add(model.text)
    return models


def choose_cpu_model(domcaps_xml: str) -> str:
    """The preferred custom model if usable here, else "" (no <cpu>: QEMU's default)."""
    return PREFERRED_CPU_MODEL if PREFERRED_CPU_MODEL in usable_cpu_models(domcaps_xml) else ""


@dataclass(frozen=True)
class NovaMetadata:
    """The Nova instance a lab guest stands for, as Nova's libvirt driver describes it."""

    name: str
    flavor_name: str
    project_uuid: str
    user_uuid: str


@dataclass(frozen=True)
class DomainConfig:
    name: str
    memory_mib: int
    kernel: Path
    cmdline: str
    serial_path: Path
    accel: Accel
    cpu_model: str
    emulator: str = "/usr/bin/qemu-system-x86_64"
    # "" lets libvirt choose; a Nova instance's domain carries the instance uuid.
    uuid: str = ""
    nova: NovaMetadata | None = None
    # A <cpu> element of the guest's own, instead of the lab's model.
    cpu_xml: str = ""

    def __post_init__(self) -> None:
        if not MIN_MEMORY_MIB <= self.memory_mib <= MAX_MEMORY_MIB:
            raise ValueError(
                f"guest {self.name}: memory_mib={self.memory_mib} outside "
                f"{MIN_MEMORY_MIB}..{MAX_MEMORY_MIB}"
            )


def host_tsc_khz(cpuinfo: str | None = None) -> int | None:
    """The host's TSC frequency where it is constant (KVM guests see the same TSC)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags: set[str] = set()
    mhz = None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and not flags:
            flags = set(value.split())
        elif key.strip() == "cpu MHz" and mhz is None:
            mhz = float(value)
    if mhz is None or not {"constant_tsc", "nonstop_tsc"} <= flags:
        return None
    return round(mhz * 1000)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    elem = ET.SubElement(parent, tag, attrs)
    if text is not None:
        elem.text = text
    return elem


def _nova_metadata(parent: ET.Element, nova: NovaMetadata, memory_mib: int) -> None:
    def q(tag: str) -> str:
        return f"{{{NOVA_NS}}}{tag}"

    inst = _sub(parent, q("instance"))
    _sub(inst, q("name"), nova.name)
    flavor = _sub(inst, q("flavor"), name=nova.flavor_name)
    _sub(flavor, q("memory"), str(memory_mib))
    _sub(flavor, q("vcpus"), "1")
    owner = _sub(inst, q("owner"))
    _sub(owner, q("user"), "lab", uuid=nova.user_uuid)
    _sub(owner, q("project"), "lab", uuid=nova.project_uuid)


def domain_xml(cfg: DomainConfig) -> str:
    dom = ET.Element("domain", {"type": cfg.accel.domain_type})
    _sub(dom, "name", cfg.name)
    if cfg.uuid:
        _sub(dom, "uuid", cfg.uuid)
    if cfg.nova is not None:
        _nova_metadata(_sub(dom, "metadata"), cfg.nova, cfg.memory_mib)
    _sub(dom, "memory", str(cfg.memory_mib), unit="MiB")
    _sub(dom, "vcpu", "1")
    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
    _sub(os_el, "kernel", str(cfg.kernel))
    _sub(os_el, "cmdline", cfg.cmdline)
    if cfg.cpu_xml:
        dom.append(ET.fromstring(cfg.cpu_xml))
    elif cfg.cpu_model:
        cpu = _sub(dom, "cpu", mode="custom", match="exact", check="none")
        _sub(cpu, "model", cfg.cpu_model, fallback="forbid")
        if cfg.accel is Accel.KVM:
            # Nested virtualisation is not offered to lab guests.
            _sub(cpu, "feature", policy="disable", name="svm")
    _sub(dom, "clock", offset="utc")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "destroy")
    _sub(dom, "on_crash", "destroy")
    devices = _sub(dom, "devices")
    _sub(devices, "emulator", cfg.emulator)
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(cfg.serial_path), append="on")
    _sub(serial, "target", port="0")
    _sub(devices, "controller", type="usb", model="none")
    _sub(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


@dataclass(frozen=True)
class GuestPlan:
    """A guest to boot, on a given lab host index or (None) spread round-robin."""

    spec: GuestSpec
    host_index: int | None = None


def load_guest_plans(path: Path) -> list[GuestPlan]:
    """Read a TOML spec: `[[guests]]` tables with the GuestSpec fields and an optional `host`."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise errors.SpecError(path, str(exc)) from exc
    return guest_plans_from_dict(raw, path)


def guest_plans_from_dict(raw: dict[str, Any], path: Path | None = None) -> list[GuestPlan]:
    entries = raw.get("guests", [])
    if not isinstance(entries, list):
        raise errors.SpecError(path, "`guests` must be an array of tables ([[guests]])")
    known = {f.name for f in dataclasses.fields(GuestSpec)}
    plans = []
    for entry in entries:
        entry = dict(entry)
        host = entry.pop("host", None)
        unknown = set(entry) - known
        if unknown:
            raise errors.SpecError(path, f"unknown keys {sorted(unknown)} (known: {sorted(known)})")
        try:
            spec = GuestSpec(**entry)
        except (TypeError, ValueError) as exc:
            raise errors.SpecError(path, f"guest {entry.get('name')}: {exc}") from exc
        if host is not None and not isinstance(host, int):
            raise errors.SpecError(path, f"guest {spec.name}: host must be a host index")
        plans.append(GuestPlan(spec=spec, host_index=host))
    names = [p.spec.name for p in plans]
    if len(set(names)) != len(names):
        raise errors.SpecError(path, "guest names must be unique")
    return plans
