"""The tuning a host can do: the agent's decisions, the kernel readings, and GetHost on
libvirt's test:/// driver (no vcpu_quota among its scheduler parameters)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from hostmaint.agent import capabilities, kernel
from hostmaint.agent.types import CgroupCpu, SchedulerReading, UserfaultfdProbe
from hostmaint.protos import agent_pb2 as pb
from hostmaint.protos import agent_pb2_grpc
from tests.agent.conftest import STOPPED, started_agent
from tests.agent.nodexml import write_node

TIMEOUT = 10
QEMU_PARAMS = (
    "cpu_shares",
    "emulator_period",
    "emulator_quota",
    "global_period",
    "global_quota",
    "iothread_period",
    "iothread_quota",
    "vcpu_period",
    "vcpu_quota",
)
CGROUP_V2 = CgroupCpu("v2", True, "'cpu' in /sys/fs/cgroup/cgroup.controllers")
NO_CGROUP_CPU = CgroupCpu("", False, "no cgroup hierarchy with the CPU controller")


# -- vCPU throttling ------------------------------------------------------------------


def test_with_vcpu_quota_a_migrating_domain_still_cannot_be_throttled() -> None:
    found = capabilities.vcpu_throttle(
        SchedulerReading("instance-1", "posix", QEMU_PARAMS), NO_CGROUP_CPU, "QEMU"
    )
    # The CPU controller is there, but libvirt's job rules refuse during a migration.
    assert not found.available and found.reason == capabilities.MIGRATING
    # libvirt's view wins over the host's cgroups
    assert "live scheduler parameters of running domain instance-1" in found.decided_by
    assert "vcpu_period, vcpu_quota present" in found.decided_by


def test_without_the_cpu_controller_libvirt_refuses_or_omits_the_quota() -> None:
    refused = capabilities.vcpu_throttle(
        SchedulerReading("instance-1", "", (), "cgroup CPU controller is not mounted"),
        CGROUP_V2,
        "QEMU",
    )
    assert not refused.available
    assert refused.reason == "libvirt refuses them: cgroup CPU controller is not mounted"
    shares_only = capabilities.vcpu_throttle(
        SchedulerReading("instance-1", "posix", ("cpu_shares",)), CGROUP_V2, "QEMU"
    )
    assert not shares_only.available
    assert shares_only.reason.startswith(
        "no vcpu_period or vcpu_quota among libvirt's posix scheduler parameters (cpu_shares)"
    )


def test_with_no_running_domain_the_hosts_cgroups_decide_for_qemu() -> None:
    yes = capabilities.vcpu_throttle(None, CGROUP_V2, "QEMU")
    assert (yes.available, yes.reason) == (False, capabilities.MIGRATING)
    assert yes.decided_by.startswith("no running domain to ask libvirt")
    assert "cgroup.controllers" in yes.decided_by
    no = capabilities.vcpu_throttle(None, NO_CGROUP_CPU, "QEMU")
    assert (no.available, no.reason) == (False, "no cgroup CPU controller on this host")
    no_quota = capabilities.vcpu_throttle(None, CgroupCpu("v1", False, "v1 at /x"), "QEMU")
    assert not no_quota.available and "CFS" in no_quota.reason
    other = capabilities.vcpu_throttle(None, CGROUP_V2, "TEST")
    assert not other.available and other.reason.endswith("say nothing of the TEST driver")


def test_the_cgroup_hierarchies_are_read_from_the_mounts(tmp_path: Path) -> None:
    v1 = tmp_path / "cpu"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("memory pids\n")
    mounts = tmp_path / "mounts"
    mounts.write_text(
        f"cgroup2 {unified} cgroup2 rw,relatime 0 0\ncgroup {v1} cgroup rw,relatime,cpu 0 0\n"
    )
    assert kernel.cgroup_cpu(str(mounts)) == CgroupCpu(
        "v1", True, f"cgroup v1 cpu hierarchy at {v1}"
    )
    (unified / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    mounts.write_text(f"cgroup2 {unified} cgroup2 rw,relatime 0 0\n")
    assert kernel.cgroup_cpu(str(mounts)).version == "v2"
    mounts.write_text("proc /proc proc rw 0 0\n")
    assert kernel.cgroup_cpu(str(mounts)).version == ""


# -- post-copy --------------------------------------------------------------------------


def probe(syscall: str = "ok", sysctl: int | None = 0, device: bool = False) -> UserfaultfdProbe:
    return UserfaultfdProbe(syscall=syscall, unprivileged_sysctl=sysctl, device=device)


def test_a_kernel_without_userfaultfd_cannot_post_copy() -> None:
    found = capabilities.postcopy(probe("ENOSYS", None), frozenset({0}), "QEMU", "7.2.0")
    assert not found.available
    assert found.reason == "the kernel has no userfaultfd (CONFIG_USERFAULTFD)"
    assert found.decided_by.startswith("userfaultfd(2): ENOSYS")


def test_who_may_use_userfaultfd() -> None:
    # every process may
    assert capabilities.postcopy(probe(sysctl=1), frozenset({64055}), "QEMU", "7.2.0").available
    # only privileged processes: QEMU as root may ...
    root = capabilities.postcopy(probe(), frozenset({0}), "QEMU", "7.2.0")
    assert root.available and root.decided_by.endswith("QEMU runs as root")
    # ... QEMU 8.1 and later through /dev/userfaultfd ...
    assert capabilities.postcopy(probe(device=True), frozenset({64055}), "QEMU", "8.2.2").available
    # ... QEMU 7.2 as another user may not
    old = capabilities.postcopy(probe(device=True), frozenset({64055}), "QEMU", "7.2.0")
    assert not old.available
    assert old.reason == (
        "vm.unprivileged_userfaultfd is 0 and QEMU runs unprivileged (uid 64055), and "
        "QEMU 7.2.0 does not open /dev/userfaultfd (8.1 and later do)"
    )
    no_device = capabilities.postcopy(probe(), frozenset({0, 64055}), "QEMU", "8.2.2")
    assert not no_device.available and no_device.reason.endswith("there is no /dev/userfaultfd")
    # no QEMU runs here to show its user: not ruled out
    idle = capabilities.postcopy(probe(), frozenset(), "QEMU", "7.2.0")
    assert idle.available and "no QEMU runs here" in idle.decided_by


def test_this_kernel_is_probed() -> None:
    found = kernel.probe_userfaultfd()
    assert found.syscall  # this machine type has a syscall number
    assert found.syscall == "ok" or found.syscall.startswith("E")


# -- GetHost on test:/// ------------------------------------------------------------------


def test_get_host_says_test_driver_domains_cannot_be_throttled(
    stub: agent_pb2_grpc.HostAgentStub,
) -> None:
    host = stub.GetHost(pb.GetHostRequest(), timeout=TIMEOUT)
    assert host.HasField("capabilities")
    throttle = host.capabilities.vcpu_throttle
    assert not throttle.available
    assert throttle.reason == (
        "no vcpu_period or vcpu_quota among libvirt's fair scheduler parameters (weight): "
        "no cgroup CPU controller with CFS bandwidth"
    )
    assert throttle.decided_by.startswith("live scheduler parameters of running domain ")
    postcopy = host.capabilities.postcopy
    assert postcopy.decided_by.startswith("userfaultfd(2): ")
    assert postcopy.available == (not postcopy.reason)


@pytest.fixture
def idle_stub(tmp_path: Path) -> Iterator[agent_pb2_grpc.HostAgentStub]:
    """An agent on a test:/// host whose only domain is shut off."""
    agent = started_agent(write_node(tmp_path / "idle.xml", [STOPPED]), grace_s=0.5)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
            yield agent_pb2_grpc.HostAgentStub(channel)
    finally:
        agent.stop()


def test_get_host_with_no_running_domain_says_how_it_decided(
    idle_stub: agent_pb2_grpc.HostAgentStub,
) -> None:
    throttle = idle_stub.GetHost(pb.GetHostRequest(), timeout=TIMEOUT).capabilities.vcpu_throttle
    assert not throttle.available
    assert throttle.decided_by == "no running domain to ask libvirt"
    assert throttle.reason == (
        "no running domain to ask libvirt, and the host's cgroups say nothing of the TEST driver"
    )
