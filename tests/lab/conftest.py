"""The local multi-host lab, brought up once per test session and down at its end."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from hostmaint.lab import cluster, network
from hostmaint.lab.guest import GuestMode, GuestSpec
from hostmaint.lab.state import ProcessRecord, Role, StateStore, record_process, stop_process

# Subnets of the test labs; override when they collide with something on the machine.
SESSION_SUBNET = os.environ.get("HOSTMAINT_LAB_TEST_SUBNET", "10.213.1.0/24")
LIFECYCLE_SUBNET = os.environ.get("HOSTMAINT_LAB_TEST_SUBNET2", "10.213.2.0/24")
SESSION_PREFIX = "hm-labt"
LIFECYCLE_PREFIX = "hm-labx"
# The guest that migrates: most of its memory written once, a small slow working set,
# so it converges at once and its transfer is dominated by the link.
MIGRATING_GUEST = GuestSpec(
    name="hm-labt-mig",
    memory_mib=256,
    working_set_mib=16,
    dirty_rate_mibps=2,
    mode=GuestMode.PACED,
    fill_mib=192,
)
IDLE_GUEST = GuestSpec(
    name="hm-labt-idle",
    memory_mib=128,
    working_set_mib=8,
    dirty_rate_mibps=1,
    mode=GuestMode.PACED,
    fill_mib=8,
)


def lab_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, mounts)"
    for binary in (cluster.LIBVIRTD, cluster.QEMU):
        if not os.access(binary, os.X_OK):
            return f"{binary} is not installed"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def require_lab() -> None:
    reason = lab_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def stale_coordinators(root: Path, current: Path) -> list[ProcessRecord]:
    """``hostmaint-coordinator`` processes whose ``--config-file`` lies under ``root`` (an
    earlier run's pytest temporary root) but not under ``current`` (this run's)."""
    found: list[ProcessRecord] = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if not any(Path(arg).name == "hostmaint-coordinator" for arg in cmd):
            continue
        if "--config-file" not in cmd[:-1]:
            continue
        config = Path(cmd[cmd.index("--config-file") + 1]).resolve()
        if config.is_relative_to(root) and not config.is_relative_to(current):
            record = record_process(Role.COORDINATOR, "", proc.pid, str(config))
            if record is not None:
                found.append(record)
    return found


OWNER_FILE = "owner.json"


def _claim(base: Path) -> None:
    """Marks this run's temporary root as owned by this process while it lives."""
    me = psutil.Process()
    (base / OWNER_FILE).write_text(json.dumps({"pid": me.pid, "started": me.create_time()}))


def _owner_alive(run_dir: Path) -> bool:
    """Whether the test run that owns this temporary root still runs (same pid, same start)."""
    try:
        owner = json.loads((run_dir / OWNER_FILE).read_text())
        return bool(psutil.Process(owner["pid"]).create_time() == owner["started"])
    except (OSError, ValueError, KeyError, psutil.Error):
        return False


@pytest.fixture(scope="session", autouse=True)
def no_stale_test_labs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tears down the labs an interrupted earlier test run left behind.

    Their namespaces, daemons and guests outlive a killed pytest, and a lab whose
    prefix is taken refuses to start. Only labs recorded under pytest's temporary
    roots of earlier runs (``/tmp/pytest-of-<user>/pytest-<n>``) whose namespaces
    still exist are torn down.
    """
    if lab_unavailable_reason() is not None:
        return
    base = tmp_path_factory.getbasetemp().resolve()
    root = base.parent
    if not root.name.startswith("pytest-of-"):
        return
    _claim(base)
    live = [d for d in root.glob("pytest-*") if d != base and _owner_alive(d)]
    for record in stale_coordinators(root, base):
        if any(Path(record.name).is_relative_to(d) for d in live):
            continue
        print(f"stale test coordinator pid {record.pid} (config {record.name})")
        stop_process(record)
    namespaces = network.list_netns()
    stale = {f.resolve().parent for f in root.glob("pytest-*/*/lab.json")}
    for state_dir in sorted(d for d in stale if not d.is_relative_to(base)):
        if any(state_dir.is_relative_to(d) for d in live):
            continue  # another test run on this machine, still running, owns it
        state = StateStore(state_dir).load()
        if not {h.netns for h in state.hosts} & namespaces:
            continue  # torn down already, or the state of a unit test
        for line in cluster.down(state_dir):
            print(f"stale test lab {state_dir}: {line}")


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.Lab]:
    require_lab()
    config = cluster.LabConfig(
        prefix=SESSION_PREFIX,
        state_dir=tmp_path_factory.mktemp("lab"),
        subnet=SESSION_SUBNET,
    )
    lab, report = cluster.Lab.up(2, [MIGRATING_GUEST, IDLE_GUEST], config)
    print(f"\nlab up: accel={report.accel} ({report.accel_reason}) cpu={report.cpu_model!r}")
    print(f"lab up phases: {report.phases_s}")
    for failure in report.agent_failures:
        print(f"lab agent failure (tolerated): {failure}")
    try:
        yield lab
    finally:
        lab.down()


@pytest.fixture
def lifecycle_config(tmp_path: Path) -> cluster.LabConfig:
    """A second, short-lived lab beside the session's: its own prefix, subnet and state."""
    require_lab()
    return cluster.LabConfig(
        prefix=LIFECYCLE_PREFIX,
        state_dir=tmp_path / "lab",
        subnet=LIFECYCLE_SUBNET,
        agents=False,
    )
