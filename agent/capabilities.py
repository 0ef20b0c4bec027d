"""Which tuning this host can do, decided from what libvirt and the kernel say (pure).

vCPU throttling (``TuneMigration.vcpu_throttle_pct``) caps each vCPU with libvirt's
``vcpu_period``/``vcpu_quota``, which QEMU's driver has only with the cgroup CPU
controller and its CFS bandwidth: a running domain's live scheduler parameters show
them as libvirt sees them. With no domain running, the host's cgroup hierarchies stand
in (libvirt uses the CPU controller unless qemu.conf's ``cgroup_controllers`` leaves it
out); a host with nothing running has nothing to throttle either.

Post-copy needs userfaultfd: the kernel must have it and QEMU must be let use it. With
``vm.unprivileged_userfaultfd = 0`` only a privileged process handles the faults the
kernel takes (KVM's accesses to guest memory are such faults), unless QEMU 8.1 or later
opens ``/dev/userfaultfd``. QEMU's own migration capabilities are not asked: libvirt
shows them only through a monitor command, which taints the domain.
"""

from __future__ import annotations

from hostmaint.agent.types import Capability, CgroupCpu, SchedulerReading, UserfaultfdProbe

VCPU_PARAMETERS = ("vcpu_period", "vcpu_quota")
QEMU_OPENS_DEVICE = (8, 1)  # the first QEMU that opens /dev/userfaultfd


# What libvirt does once the CPU controller is there: it sets vcpu_quota under a modify
# job, which the job of a migration excludes until the migration ends.
MIGRATING = (
    "libvirt changes scheduler parameters only under a modify job, which a migration's "
    "job excludes: a migrating domain's vCPUs cannot be capped until its migration ends"
)


def vcpu_throttle(
    reading: SchedulerReading | None, cgroup: CgroupCpu, hypervisor_type: str
) -> Capability:
    """Whether the vCPUs of a migrating domain can be capped (the migration ladder's step).

    The CPU controller is decided from a running domain's live scheduler parameters, or
    the cgroups when none runs; where it is there, libvirt's job rules still refuse."""
    found = _cpu_quota(reading, cgroup, hypervisor_type)
    if not found.available:
        return found
    return Capability(False, MIGRATING, f"{found.decided_by}; {MIGRATING.split(':')[0]}")


def _cpu_quota(
    reading: SchedulerReading | None, cgroup: CgroupCpu, hypervisor_type: str
) -> Capability:
    """Whether libvirt can cap a running domain's vCPUs at all."""
    if reading is not None:
        asked = f"live scheduler parameters of running domain {reading.domain_name}"
        if reading.error:
            return Capability(False, f"libvirt refuses them: {reading.error}", asked)
        missing = [p for p in VCPU_PARAMETERS if p not in reading.parameters]
        if missing:
            have = ", ".join(reading.parameters) or "none"
            scheduler = f"{reading.scheduler} scheduler" if reading.scheduler else "scheduler"
            return Capability(
                False,
                f"no {' or '.join(missing)} among libvirt's {scheduler} parameters ({have}): "
                "no cgroup CPU controller with CFS bandwidth",
                asked,
            )
        return Capability(True, "", f"{asked}: {', '.join(VCPU_PARAMETERS)} present")
    none_runs = "no running domain to ask libvirt"
    if hypervisor_type != "QEMU":
        return Capability(
            False,
            f"{none_runs}, and the host's cgroups say nothing of the {hypervisor_type} driver",
            none_runs,
        )
    decided_by = f"{none_runs}; {cgroup.where}"
    if not cgroup.version:
        return Capability(False, "no cgroup CPU controller on this host", decided_by)
    if not cgroup.bandwidth:
        return Capability(False, "the cgroup CPU controller has no CFS quotas", decided_by)
    return Capability(
        True, "", f"{decided_by} (libvirt uses it unless qemu.conf's cgroup_controllers omits it)"
    )


def postcopy(
    probe: UserfaultfdProbe,
    qemu_uids: frozenset[int],
    hypervisor_type: str,
    hypervisor_version: str,
) -> Capability:
    """From the kernel's answers and the users this host's QEMU processes run as."""
    sysctl = "absent" if probe.unprivileged_sysctl is None else str(probe.unprivileged_sysctl)
    facts = (
        f"userfaultfd(2): {probe.syscall or 'not tried on this machine type'}; "
        f"vm.unprivileged_userfaultfd: {sysctl}; "
        f"/dev/userfaultfd: {'present' if probe.device else 'absent'}"
    )
    if probe.syscall == "ENOSYS":
        return Capability(False, "the kernel has no userfaultfd (CONFIG_USERFAULTFD)", facts)
    if probe.unprivileged_sysctl != 0:
        # 1: every process may; absent: a kernel before 5.2 (every process may) or one whose
        # syscall answered, or nothing says it lacks one
        return Capability(True, "", facts)
    if qemu_uids and qemu_uids == {0}:
        return Capability(True, "", f"{facts}; QEMU runs as root")
    qemu = _version(hypervisor_version) if hypervisor_type == "QEMU" else None
    if probe.device and qemu is not None and qemu >= QEMU_OPENS_DEVICE:
        return Capability(True, "", f"{facts}; QEMU {hypervisor_version} opens /dev/userfaultfd")
    if not qemu_uids:
        return Capability(True, "", f"{facts}; no QEMU runs here to show its user")
    users = ", ".join(str(u) for u in sorted(qemu_uids - {0}))
    if not probe.device:
        why = "and there is no /dev/userfaultfd"
    else:
        version = f"QEMU {hypervisor_version}" if qemu is not None else "this QEMU"
        why = f"and {version} does not open /dev/userfaultfd (8.1 and later do)"
    return Capability(
        False,
        f"vm.unprivileged_userfaultfd is 0 and QEMU runs unprivileged (uid {users}), {why}",
        facts,
    )


def _version(text: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(p) for p in text.split("."))
    except ValueError:
        return None
