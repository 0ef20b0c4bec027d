"""What the kernel offers QEMU's tuning, read from /proc and /sys and one syscall.

userfaultfd (post-copy: the destination's QEMU catches its guest's faults on pages not
yet there) is tried with the syscall itself; the cgroup CPU controller (vCPU quotas) is
looked up among the mounted cgroup hierarchies. Decisions are made elsewhere
(``capabilities``), from these typed readings.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
from pathlib import Path

from hostmaint.agent.types import CgroupCpu, UserfaultfdProbe

LOG = logging.getLogger(__name__)
# userfaultfd's syscall number per machine (Linux's syscall tables)
_USERFAULTFD_NR = {
    "x86_64": 323,
    "i386": 374,
    "i686": 374,
    "aarch64": 282,
    "riscv64": 282,
    "armv7l": 388,
    "ppc64le": 364,
    "ppc64": 364,
    "s390x": 355,
}
UNPRIVILEGED_SYSCTL = "/proc/sys/vm/unprivileged_userfaultfd"
DEVICE = "/dev/userfaultfd"
MOUNTS = "/proc/self/mounts"


def probe_userfaultfd(
    *, sysctl: str = UNPRIVILEGED_SYSCTL, device: str = DEVICE
) -> UserfaultfdProbe:
    """Opens (and closes) a userfaultfd, and reads who may."""
    return UserfaultfdProbe(
        syscall=_try_userfaultfd(),
        unprivileged_sysctl=_read_int(sysctl),
        device=os.path.exists(device),
    )


def _try_userfaultfd() -> str:
    nr = _USERFAULTFD_NR.get(platform.machine())
    if nr is None:
        return ""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = int(libc.syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK))
    if fd >= 0:
        os.close(fd)
        return "ok"
    code = ctypes.get_errno()
    return errno.errorcode.get(code, str(code))


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        LOG.warning("cannot read path=%s error=%s", path, e)
        return None


def cgroup_cpu(mounts: str = MOUNTS) -> CgroupCpu:
    """The CPU controller among the mounted cgroup hierarchies, with CFS bandwidth or not.

    cgroup v2: "cpu" in the unified hierarchy's cgroup.controllers (cpu.max then caps a
    cgroup); v1: a hierarchy mounted with the "cpu" option, cpu.cfs_quota_us in it.
    """
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError as e:
        return CgroupCpu("", False, f"{mounts} unreadable ({e})")
    for line in lines:
        fields = line.split()
        if len(fields) < 4:
            continue
        where, fstype, options = fields[1], fields[2], fields[3].split(",")
        if fstype == "cgroup" and "cpu" in options:
            quota = os.path.join(where, "cpu.cfs_quota_us")
            return CgroupCpu("v1", os.path.exists(quota), f"cgroup v1 cpu hierarchy at {where}")
        if fstype == "cgroup2":
            controllers = os.path.join(where, "cgroup.controllers")
            try:
                offered = Path(controllers).read_text().split()
            except OSError:
                continue
            if "cpu" in offered:
                return CgroupCpu("v2", True, f"'cpu' in {controllers}")
    return CgroupCpu("", False, f"no cgroup hierarchy with the CPU controller in {mounts}")
