"""Host figures libvirt does not give (load, qemu RSS and users, NIC speed), from psutil."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable

import psutil

from hostmaint.agent.types import HostLoad

LOG = logging.getLogger(__name__)


def qemu_rss_bytes(domain_names: Iterable[str]) -> int:
    """Sum of the RSS of the qemu processes running these domains (by `-name guest=`)."""
    wanted = {f"guest={name}" for name in domain_names}
    if not wanted:
        return 0
    total = 0
    for proc in psutil.process_iter(["name", "cmdline", "memory_info"]):
        name = proc.info.get("name") or ""
        if not name.startswith("qemu"):
            continue
        cmdline = proc.info.get("cmdline") or []
        if any(arg.split(",", 1)[0] in wanted for arg in cmdline):
            mem = proc.info.get("memory_info")
            total += int(mem.rss) if mem is not None else 0
    return total


def qemu_uids(domain_names: Iterable[str]) -> frozenset[int]:
    """The effective users of the qemu processes running these domains."""
    wanted = {f"guest={name}" for name in domain_names}
    if not wanted:
        return frozenset()
    found = set()
    for proc in psutil.process_iter(["name", "cmdline", "uids"]):
        name = proc.info.get("name") or ""
        if not name.startswith("qemu"):
            continue
        cmdline = proc.info.get("cmdline") or []
        uids = proc.info.get("uids")
        if uids is not None and any(arg.split(",", 1)[0] in wanted for arg in cmdline):
            found.add(int(uids.effective))
    return frozenset(found)


def read_host_load(domain_names: Iterable[str], migration_interface: str) -> HostLoad:
    load1, load5, load15 = os.getloadavg()
    speed = 0
    if migration_interface:
        stats = psutil.net_if_stats().get(migration_interface)
        if stats is None:
            LOG.warning("migration interface not found iface=%s", migration_interface)
        else:
            speed = max(0, int(stats.speed))
    return HostLoad(
        load_1m=load1,
        load_5m=load5,
        load_15m=load15,
        qemu_rss_bytes=qemu_rss_bytes(domain_names),
        migration_interface=migration_interface,
        migration_nic_speed_mbps=speed,
    )


_SHARED_FS = frozenset(
    {
        "nfs",
        "nfs4",
        "ceph",
        "glusterfs",
        "fuse.glusterfs",
        "gpfs",
        "ocfs2",
        "gfs2",
        "lustre",
        "cifs",
    }
)


def shared_path_checker(shared_prefixes: Iterable[str]) -> Callable[[str], bool]:
    """A predicate: does this disk path live on storage every host mounts?

    True under an operator-configured prefix (e.g. an NFS-backed
    /var/lib/nova/instances) or on a network filesystem type.
    """
    prefixes = tuple(p.rstrip("/") + "/" for p in shared_prefixes if p)

    def is_shared(path: str) -> bool:
        if prefixes and path.startswith(prefixes):
            return True
        best = ""
        fstype = ""
        for part in psutil.disk_partitions(all=True):
            mount = part.mountpoint.rstrip("/") + "/"
            if path.startswith(mount) and len(mount) > len(best):
                best, fstype = mount, part.fstype
        return fstype in _SHARED_FS

    return is_shared
