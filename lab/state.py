"""What the lab created, on disk: hosts, guests and every process it started.

The record is a JSON file in the lab's state directory, rewritten atomically
after each step of `up`, so a crash at any point leaves a record that `down`
can act on. Processes are identified by pid *and* start time (field 22 of
/proc/<pid>/stat), so a recycled pid is never mistaken for ours.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from . import errors

LOG = logging.getLogger(__name__)

STATE_FILE = "lab.json"
LOCK_FILE = "lock"
FORMAT_VERSION = 1


class Role(str, Enum):
    LIBVIRTD = "libvirtd"
    AGENT = "agent"
    QEMU = "qemu"
    COORDINATOR = "coordinator"  # one a test or the demo started (not in the lab's state)


class Phase(str, Enum):
    STARTING = "starting"
    UP = "up"
    STOPPING = "stopping"


@dataclass(frozen=True)
class ProcessRecord:
    """One process the lab started (or, for QEMU, had its daemon start)."""

    role: Role
    host: str
    pid: int
    start_ticks: int
    name: str = ""

    def is_alive(self) -> bool:
        return start_ticks_of(self.pid) == self.start_ticks


@dataclass(frozen=True)
class HostRecord:
    name: str
    index: int
    netns: str
    address: str
    host_dir: str
    uuid: str
    agent_port: int

    @property
    def run_dir(self) -> Path:
        return Path(self.host_dir) / "run"

    @property
    def socket_path(self) -> Path:
        return self.run_dir / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket_path}"


@dataclass(frozen=True)
class GuestRecord:
    name: str
    memory_mib: int
    cmdline: str
    initial_host: str
    serial_path: str


@dataclass(frozen=True)
class LabState:
    prefix: str
    state_dir: str
    subnet: str
    rate_mbit: int
    accel: str
    cpu_model: str
    kernel: str
    switch_netns: str
    bridge: str
    agents: bool
    phase: Phase
    hosts: tuple[HostRecord, ...] = ()
    guests: tuple[GuestRecord, ...] = ()
    processes: tuple[ProcessRecord, ...] = ()
    setup_notes: tuple[str, ...] = ()
    agent_failures: tuple[str, ...] = ()
    version: int = FORMAT_VERSION

    def with_process(self, record: ProcessRecord) -> LabState:
        others = tuple(
            p
            for p in self.processes
            if not (p.role == record.role and p.host == record.host and p.name == record.name)
        )
        return dataclasses.replace(self, processes=(*others, record))

    def process(self, role: Role, host: str, name: str = "") -> ProcessRecord | None:
        for p in self.processes:
            if p.role == role and p.host == host and p.name == name:
                return p
        return None


def start_ticks_of(pid: int) -> int | None:
    """Start time of a live process in clock ticks since boot, None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after it.
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie has exited; only its parent has yet to reap it
        return None
    return int(fields[19])


def record_process(role: Role, host: str, pid: int, name: str = "") -> ProcessRecord | None:
    ticks = start_ticks_of(pid)
    if ticks is None:
        return None
    return ProcessRecord(role=role, host=host, pid=pid, start_ticks=ticks, name=name)


def _to_json(state: LabState) -> dict[str, Any]:
    return dataclasses.asdict(state)


def _from_json(raw: dict[str, Any]) -> LabState:
    if raw.get("version") != FORMAT_VERSION:
        raise errors.LabError(f"lab state format {raw.get('version')} is not {FORMAT_VERSION}")
    return LabState(
        **{
            **raw,
            "phase": Phase(raw["phase"]),
            "hosts": tuple(HostRecord(**h) for h in raw["hosts"]),
            "guests": tuple(GuestRecord(**g) for g in raw["guests"]),
            "processes": tuple(
                ProcessRecord(**{**p, "role": Role(p["role"])}) for p in raw["processes"]
            ),
            "setup_notes": tuple(raw["setup_notes"]),
            "agent_failures": tuple(raw["agent_failures"]),
        }
    )


class StateStore:
    """The lab's state directory: the record file and a lock against concurrent commands."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    @property
    def path(self) -> Path:
        return self.state_dir / STATE_FILE

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> LabState:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            raise errors.LabNotRunning(self.state_dir) from None
        return _from_json(raw)

    def save(self, state: LabState) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_to_json(state), indent=2, sort_keys=True))
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def remove_dir(self) -> None:
        """Remove the lock and the directory itself, unless something else was put in it."""
        (self.state_dir / LOCK_FILE).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.state_dir.rmdir()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise errors.LabBusy(self.state_dir) from None
                raise
            yield
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Liveness:
    """Which recorded processes still run."""

    alive: tuple[ProcessRecord, ...] = field(default_factory=tuple)
    dead: tuple[ProcessRecord, ...] = field(default_factory=tuple)


# A lab is whole while these run. QEMU records are not among them: a guest's
# QEMU ends on its source host whenever the guest migrates away.
ESSENTIAL_ROLES = (Role.LIBVIRTD, Role.AGENT)


def liveness(state: LabState) -> Liveness:
    """Which of the lab's daemons and agents still run."""
    essential = [p for p in state.processes if p.role in ESSENTIAL_ROLES]
    alive = tuple(p for p in essential if p.is_alive())
    dead = tuple(p for p in essential if not p.is_alive())
    return Liveness(alive=alive, dead=dead)


def wait_until(pred: Callable[[], bool], timeout_s: float, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval_s)
    return pred()


def _gone(record: ProcessRecord) -> bool:
    """True once the process has exited; collects it if it is a child of ours (no zombie)."""
    try:
        os.waitpid(record.pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: init reaps it
    return not record.is_alive()


def stop_process(record: ProcessRecord, grace_s: float = 10.0) -> bool:
    """SIGTERM, then SIGKILL after grace_s, a process we recorded; False if it was gone."""
    if not record.is_alive():
        return False
    LOG.info("stopping role=%s host=%s pid=%d", record.role.value, record.host, record.pid)
    os.kill(record.pid, signal.SIGTERM)
    if not wait_until(lambda: _gone(record), grace_s, 0.1) and record.is_alive():
        os.kill(record.pid, signal.SIGKILL)
        wait_until(lambda: _gone(record), 5.0, 0.1)
    return True
