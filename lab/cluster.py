"""Several KVM "hosts" on one machine: the lab's composition and lifecycle.

Each lab host is a libvirtd in its own network namespace (an address on the
lab's private bridge, its NIC shaped both ways), its own UTS namespace (its
hostname is the lab host's name) and its own private mount namespace (its own /run/libvirt, /var/lib/libvirt, /etc/libvirt, ... bound
from the lab's state directory), with its own host UUID and pid file,
reachable from outside as qemu+unix:///system?socket=<its run dir>/libvirt-sock.
Beside each daemon runs one hostmaint agent on 127.0.0.1.

Every process the lab starts is recorded (pid and start time) before the lab
waits on it; `down` stops exactly those, and the QEMU processes its daemons
started (found by the daemons' own pid files), then deletes the namespaces
and the state directory.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from . import domains, errors, integrity, network
from .domains import GuestPlan, load_guest_plans
from .guest import (
    GuestEvent,
    GuestFailure,
    GuestReady,
    GuestSpec,
    GuestVerify,
    build_guest,
    guest_cmdline,
    parse_serial,
)
from .state import (
    GuestRecord,
    HostRecord,
    LabState,
    Phase,
    ProcessRecord,
    Role,
    StateStore,
    liveness,
    record_process,
    start_ticks_of,
    stop_process,
    wait_until,
)

LOG = logging.getLogger(__name__)

DEFAULT_PREFIX = "hm-lab"
DEFAULT_SUBNET = "10.213.0.0/24"
DEFAULT_RATE_MBIT = 400
# The lab's agents destroy an incoming copy left behind after this long (the agent's
# default is 120 s; a lab test waits for it).
STALE_INCOMING_GRACE_S = 15
LIBVIRTD = "/usr/sbin/libvirtd"
QEMU = "/usr/bin/qemu-system-x86_64"
REQUIRED_TOOLS = {
    "ip": "iproute2",
    "tc": "iproute2",
    "unshare": "util-linux",
    "mount": "mount",
}
# Directories libvirtd expects on the machine; in the lab they are only mount points.
MOUNT_POINTS = {
    "run": Path("/run/libvirt"),
    "lib": Path("/var/lib/libvirt"),
    "cache": Path("/var/cache/libvirt"),
    "log": Path("/var/log/libvirt"),
    "etc": Path("/etc/libvirt"),
}
MAX_PREFIX_LEN = 10  # interface and namespace names stay short


def default_state_dir(prefix: str = DEFAULT_PREFIX) -> Path:
    return Path(os.environ.get("HOSTMAINT_LAB_STATE_DIR", f"/var/lib/{prefix}"))


@dataclass(frozen=True)
class LabConfig:
    prefix: str = DEFAULT_PREFIX
    state_dir: Path = field(default_factory=default_state_dir)
    subnet: str = DEFAULT_SUBNET
    rate_mbit: int = DEFAULT_RATE_MBIT
    agents: bool = True
    agent_port_base: int | None = None
    agent_binary: str | None = None
    ready_timeout_s: float = 30.0
    wait_guests: bool = True
    force_tcg: bool = False
    # A fresh `up` that fails stops what it started; False keeps it (and its logs) to debug.
    rollback_on_failure: bool = True
    guest_ready_timeout_s: float = 300.0
    agent_ready_timeout_s: float = 15.0
    kernel: Path | None = None

    def __post_init__(self) -> None:
        if (
            not (0 < len(self.prefix) <= MAX_PREFIX_LEN)
            or not self.prefix.replace("-", "").isalnum()
        ):
            raise errors.LabError(f"prefix {self.prefix!r}: 1..{MAX_PREFIX_LEN} of [a-z0-9-]")
        if self.rate_mbit <= 0:
            raise errors.LabError(f"rate_mbit={self.rate_mbit} must be positive")
        ipaddress.IPv4Network(self.subnet)


@dataclass(frozen=True)
class LabHost:
    name: str
    index: int
    netns: str
    uri: str
    migration_address: str
    agent_address: str
    run_dir: Path


@dataclass(frozen=True)
class UpReport:
    accel: str
    accel_reason: str
    cpu_model: str
    setup_notes: tuple[str, ...]
    agent_failures: tuple[str, ...]
    recovered: tuple[str, ...]
    phases_s: tuple[tuple[str, float], ...]


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise errors.NotRoot(os.geteuid())
    missing = [f"{tool} ({pkg})" for tool, pkg in REQUIRED_TOOLS.items() if not shutil.which(tool)]
    for binary, pkg in ((LIBVIRTD, "libvirt-daemon-driver-qemu"), (QEMU, "qemu-system-x86")):
        if not os.access(binary, os.X_OK):
            missing.append(f"{binary} ({pkg})")
    if missing:
        raise errors.PrerequisiteMissing(missing, "install them with apt-get; the lab never does")


def prepare_machine() -> list[str]:
    """Users, groups and mount points libvirtd insists on; returns what was created."""
    notes = []
    for group in ("kvm", "libvirt-qemu"):
        if subprocess.run(["getent", "group", group], capture_output=True).returncode != 0:
            subprocess.run(["groupadd", "--system", group], check=True)
            notes.append(
                f"created group {group} (libvirt's QEMU driver refuses to start without it)"
            )
    if subprocess.run(["getent", "passwd", "libvirt-qemu"], capture_output=True).returncode != 0:
        subprocess.run(
            [
                *("useradd", "--system", "--gid", "libvirt-qemu", "--no-create-home"),
                *("--home-dir", "/var/lib/libvirt", "--shell", "/usr/sbin/nologin", "libvirt-qemu"),
            ],
            check=True,
        )
        notes.append(
            "created user libvirt-qemu (libvirt's QEMU driver refuses to start without it)"
        )
    for path in (*MOUNT_POINTS.values(), Path("/var/lib/libvirt/qemu")):
        if not path.exists():
            path.mkdir(parents=True)
            notes.append(f"created empty directory {path} (a mount point for the lab's daemons)")
    notes.extend(machine_cpuset())
    return notes


def machine_cpuset(mounts: str | None = None) -> list[str]:
    """Gives cgroup v1's `machine` cpuset its CPUs and memory nodes before any daemon starts.

    Every lab daemon creates libvirt's `machine` partition on first use. On a machine
    where it does not exist yet, one daemon's `mkdir machine` can be followed by another
    daemon creating its guest's group under it before the first copied the parent's
    `cpuset.cpus` and `cpuset.mems` into it: that guest inherits empty sets and fails to
    start ("Unable to write to '.../cpuset/machine/qemu-1-<name>/emulator/tasks': No
    space left on device"). Created here once, filled, it is never empty.
    """
    if mounts is None:
        mounts = Path("/proc/self/mounts").read_text()
    notes = []
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 4 or parts[2] != "cgroup" or "cpuset" not in parts[3].split(","):
            continue
        root = Path(parts[1])
        machine = root / "machine"
        if not machine.exists():
            machine.mkdir()
            notes.append(f"created the cgroup {machine}")
        for key in ("cpuset.cpus", "cpuset.mems"):
            if not (machine / key).read_text().strip():
                (machine / key).write_text((root / key).read_text())
                notes.append(f"gave {machine / key} its parent's value")
    return notes


def cgroup_mounts(mounts: str | None = None) -> str:
    """Shell commands that mount the machine's cgroup hierarchies again.

    `ip netns exec` mounts a fresh /sys for the namespace, with an empty
    /sys/fs/cgroup: without these, libvirt finds no CPU controller and vCPU
    quotas (the agent's throttling) are refused.
    """
    if mounts is None:
        mounts = Path("/proc/self/mounts").read_text()
    cmds = []
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 4 or not parts[1].startswith("/sys/fs/cgroup"):
            continue
        fstype, target, options = parts[2], parts[1], parts[3].split(",")
        if fstype == "cgroup2":
            cmds.append(
                f"mkdir -p {shlex.quote(target)} && mount -t cgroup2 none {shlex.quote(target)}"
            )
        elif fstype == "cgroup":
            keep = [
                o
                for o in options
                if o not in ("rw", "ro", "relatime", "noatime", "nosuid", "nodev", "noexec")
            ]
            cmds.append(
                f"mkdir -p {shlex.quote(target)} && "
                f"mount -t cgroup -o {shlex.quote(','.join(keep))} cgroup {shlex.quote(target)}"
            )
        elif fstype == "tmpfs" and target == "/sys/fs/cgroup":
            cmds.insert(0, "mount -t tmpfs -o mode=755 cgroup_root /sys/fs/cgroup")
    return "".join(f"{c}; " for c in cmds)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    """libvirt's default handler prints every error; the lab handles them as exceptions."""


def _open(uri: str) -> libvirt.virConnect:
    libvirt.registerErrorHandler(_ignore_libvirt_error, None)
    conn = libvirt.open(uri)
    if conn is None:  # older bindings return None instead of raising
        raise errors.LabError(f"cannot connect to {uri}")
    return conn


def _try_open(uri: str) -> libvirt.virConnect | None:
    try:
        return _open(uri)
    except libvirt.libvirtError:
        return None


class Lab:
    """A running lab: hosts, guests, and the operations the tests and demo need."""

    def __init__(self, store: StateStore, state: LabState) -> None:
        self._store = store
        self._state = state

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def load(cls, state_dir: Path | None = None) -> Lab:
        store = StateStore(state_dir or default_state_dir())
        return cls(store, store.load())

    @classmethod
    def up(
        cls,
        n_hosts: int,
        guests: Sequence[GuestPlan | GuestSpec] = (),
        config: LabConfig | None = None,
        *,
        recover: bool = False,
    ) -> tuple[Lab, UpReport]:
        """Start a lab (or, with recover, restart what a crashed one lost); return it."""
        config = config or LabConfig()
        check_prerequisites()
        plans = [g if isinstance(g, GuestPlan) else GuestPlan(g) for g in guests]
        store = StateStore(config.state_dir)
        fresh = not store.exists()
        try:
            with store.locked():
                return _Starter(store, config).run(n_hosts, plans, recover=recover)
        except BaseException as exc:  # an interrupted fresh up is rolled back too
            if not (fresh and store.exists() and config.rollback_on_failure):
                raise
            LOG.warning("up failed, rolling back: %s", exc)
            down(config.state_dir)
            raise

    # ---- views --------------------------------------------------------------------------

    @property
    def state(self) -> LabState:
        return self._state

    @property
    def state_dir(self) -> Path:
        return self._store.state_dir

    @property
    def hosts(self) -> list[LabHost]:
        return [self._host(h) for h in self._state.hosts]

    @property
    def guest_names(self) -> list[str]:
        return [g.name for g in self._state.guests]

    @property
    def rate_mbit(self) -> int:
        return self._state.rate_mbit

    def host(self, name: str) -> LabHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def _host(self, h: HostRecord) -> LabHost:
        return LabHost(
            name=h.name,
            index=h.index,
            netns=h.netns,
            uri=h.uri,
            migration_address=h.address,
            agent_address=f"127.0.0.1:{h.agent_port}",
            run_dir=h.run_dir,
        )

    def link_bytes(self, host: LabHost) -> tuple[int, int]:
        """(rx_bytes, tx_bytes) so far on the host's lab NIC, for throughput figures."""
        daemon = self._state.process(Role.LIBVIRTD, host.name)
        if daemon is None or not daemon.is_alive():
            raise errors.LabError(f"libvirtd of {host.name} is not running")
        return network.link_bytes(daemon.pid)

    def guest_serial(self, name: str) -> str:
        for g in self._state.guests:
            if g.name == name:
                try:
                    return Path(g.serial_path).read_text(errors="replace")
                except FileNotFoundError:
                    return ""
        raise KeyError(name)

    def guest_events(self, name: str) -> list[GuestEvent]:
        """The guest's serial log parsed into its events (ready, progress, error)."""
        return parse_serial(self.guest_serial(name))

    def verify_memory(
        self, names: Sequence[str], timeout_s: float = integrity.DEFAULT_TIMEOUT_S
    ) -> dict[str, GuestVerify]:
        """Each guest's own memory check, once a full sweep ran after this call.

        Call it once a migration ended: ``mismatched_pages`` is then 0 exactly when
        no page the guest wrote was found lost or changed, here or before (see
        lab/integrity.py). VerifyTimeout if a guest completes no sweep in time.
        """
        consoles = {n: functools.partial(self.guest_serial, n) for n in names}
        return integrity.wait_verified(consoles, timeout_s)

    def wait_guests_ready(self, timeout_s: float = 60.0) -> dict[str, GuestReady]:
        """Wait until every guest printed its ready line; GuestStartFailed on error or timeout."""
        ready: dict[str, GuestReady] = {}
        deadline = time.monotonic() + timeout_s
        while True:
            for g in self._state.guests:
                if g.name in ready:
                    continue
                outcome = [
                    e for e in self.guest_events(g.name) if isinstance(e, GuestReady | GuestFailure)
                ]
                if outcome and isinstance(outcome[-1], GuestFailure):
                    failure = outcome[-1]
                    details = " ".join(f"{k}={v}" for k, v in failure.details.items())
                    raise errors.GuestStartFailed(
                        g.name, g.initial_host, f"guest reported {failure.reason} {details}"
                    )
                if outcome and isinstance(outcome[-1], GuestReady):
                    ready[g.name] = outcome[-1]
            if len(ready) == len(self._state.guests):
                return ready
            if time.monotonic() >= deadline:
                late = [g.name for g in self._state.guests if g.name not in ready]
                raise errors.GuestStartFailed(
                    ",".join(late), "?", f"no ready line on the serial port after {timeout_s}s"
                )
            time.sleep(0.2)

    def running_on(self, guest_name: str) -> list[LabHost]:
        """Every lab host whose daemon has this guest running (not paused for migration)."""
        found = []
        for host in self.hosts:
            conn = _try_open(host.uri)
            if conn is None:
                continue
            try:
                dom = conn.lookupByName(guest_name)
                if dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING:
                    found.append(host)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
            finally:
                conn.close()
        return found

    def where(self, guest_name: str) -> LabHost:
        """The one host running the guest; GuestPlacementError if none or several."""
        hosts = self.running_on(guest_name)
        if len(hosts) != 1:
            raise errors.GuestPlacementError(guest_name, [h.name for h in hosts])
        return hosts[0]

    def status(self) -> dict[str, Any]:
        live = liveness(self._state)
        alive = {(p.role, p.host, p.name) for p in live.alive}
        hosts = []
        for h in self.hosts:
            hosts.append(
                {
                    "name": h.name,
                    "uri": h.uri,
                    "migration_address": h.migration_address,
                    "agent_address": h.agent_address,
                    "libvirtd": "running" if (Role.LIBVIRTD, h.name, "") in alive else "dead",
                    "agent": (
                        "running"
                        if (Role.AGENT, h.name, "") in alive
                        else ("disabled" if not self._state.agents else "not running")
                    ),
                }
            )
        guests = {g: [h.name for h in self.running_on(g)] for g in self.guest_names}
        return {
            "state_dir": str(self.state_dir),
            "phase": self._state.phase.value,
            "accel": self._state.accel,
            "cpu_model": self._state.cpu_model or "(qemu default)",
            "subnet": self._state.subnet,
            "rate_mbit": self._state.rate_mbit,
            "hosts": hosts,
            "guests": guests,
            "dead_processes": [f"{p.role.value}/{p.host}/{p.pid}" for p in live.dead],
            "agent_failures": list(self._state.agent_failures),
        }

    # ---- guests added to a running lab -------------------------------------------------

    def add_guest(
        self,
        spec: GuestSpec,
        host: str,
        *,
        uuid: str = "",
        nova: domains.NovaMetadata | None = None,
        cpu_xml: str = "",
        wait: bool = True,
        ready_timeout_s: float = 300.0,
    ) -> None:
        """Boot one more guest on `host`, with a chosen domain uuid and Nova metadata.

        `cpu_xml` gives it a <cpu> element of its own instead of the lab's model
        (not recorded either: a recovered lab boots it with the lab's model).

        A Nova instance's domain carries the instance uuid and Nova's metadata:
        this makes a guest the lab's stand-in for a server Nova created. The
        guest is recorded like those of `up` (its serial log, its QEMU process);
        the uuid is not, so a recovered lab boots it again under a new one.
        With `wait`, returns once every guest printed its ready line; else at
        once (boot several, then `wait_guests_ready`).
        """
        with self._store.locked():
            state = self._store.load()
            if any(g.name == spec.name for g in state.guests):
                raise errors.SpecError(None, f"guest {spec.name} exists already")
            h = next((x for x in state.hosts if x.name == host), None)
            if h is None:
                raise errors.SpecError(None, f"guest {spec.name}: no lab host {host}")
            accel = domains.Accel(state.accel)
            khz = domains.host_tsc_khz() if accel is domains.Accel.KVM else None
            record = GuestRecord(
                name=spec.name,
                memory_mib=spec.memory_mib,
                cmdline=guest_cmdline(spec) + (f" tsc_khz={khz}" if khz else ""),
                initial_host=h.name,
                serial_path=str(Path(state.state_dir) / "serial" / f"{spec.name}.log"),
            )
            Path(record.serial_path).parent.mkdir(parents=True, exist_ok=True)
            cfg = domains.DomainConfig(
                name=record.name,
                memory_mib=record.memory_mib,
                kernel=Path(state.kernel),
                cmdline=record.cmdline,
                serial_path=Path(record.serial_path),
                accel=accel,
                cpu_model=state.cpu_model,
                uuid=uuid,
                nova=nova,
                cpu_xml=cpu_xml,
            )
            state = dataclasses.replace(state, guests=(*state.guests, record))
            self._store.save(state)
            conn = _open(h.uri)
            try:
                conn.createXML(domains.domain_xml(cfg), 0)
            except libvirt.libvirtError as exc:
                state = dataclasses.replace(state, guests=state.guests[:-1])
                raise errors.GuestStartFailed(spec.name, h.name, str(exc)) from exc
            finally:
                conn.close()
                for guest, pid in _qemu_pids_of_host(h):
                    rec = record_process(Role.QEMU, h.name, pid, guest)
                    if rec and state.process(Role.QEMU, h.name, guest) != rec:
                        state = state.with_process(rec)
                self._store.save(state)
                self._state = state
        LOG.info("started guest=%s host=%s uuid=%s", spec.name, h.name, uuid or "(libvirt's)")
        if wait:
            self.wait_guests_ready(ready_timeout_s)

    # ---- faults: a host's daemons stopped and started again ------------------------------

    def _starter(self) -> _Starter:
        s = self._state
        config = LabConfig(
            prefix=s.prefix,
            state_dir=self.state_dir,
            subnet=s.subnet,
            rate_mbit=s.rate_mbit,
            agents=s.agents,
        )
        return _Starter(self._store, config)

    def restart_libvirtd(self, host_name: str, grace_s: float = 10.0) -> ProcessRecord:
        """Stop the host's libvirtd if it runs (SIGTERM), start it again; its guests live on.

        The new daemon finds the running QEMU processes through the status files in its
        private run directory and reconnects to them, as after a package upgrade.
        """
        h = self._record(host_name)
        with self._store.locked():
            old = self._state.process(Role.LIBVIRTD, h.name)
            if old is not None:
                stop_process(old, grace_s)
            self._state = self._starter()._ensure_daemon(self._state, h)
            self._store.save(self._state)
        new = self._state.process(Role.LIBVIRTD, h.name)
        assert new is not None
        return new

    def restart_agent(self, host_name: str, grace_s: float = 5.0) -> ProcessRecord:
        """Stop the host's agent if it runs (SIGTERM), start it again on the same port."""
        h = self._record(host_name)
        if not self._state.agents:
            raise errors.LabError("this lab runs no agents")
        with self._store.locked():
            old = self._state.process(Role.AGENT, h.name)
            if old is not None:
                stop_process(old, grace_s)
            self._state, failure = self._starter()._ensure_agent(self._state, h)
            self._store.save(self._state)
        new = self._state.process(Role.AGENT, h.name)
        if failure or new is None or not new.is_alive():
            raise errors.LabError(failure or f"agent of {h.name} did not start")
        return new

    def hide_cpu_features(self, host_name: str, features: Sequence[str]) -> Path:
        """Makes one host's libvirt see a KVM host CPU without `features` (QEMU's names).

        Every lab host runs on this machine's CPU; a host that lacks a feature is
        made by editing the QEMU capabilities libvirt cached for it (the host CPU
        that KVM offers, as QEMU expanded it) and restarting its libvirtd, which
        reloads the cache. libvirt's CPU comparisons on that host then report the
        features missing. Its QEMU still has them: this is libvirt's view only.
        Returns the cache file edited.
        """
        h = self._record(host_name)
        conn = _open(self.host(host_name).uri)
        try:
            conn.getDomainCapabilities()  # probes QEMU and writes the cache, if not done yet
        finally:
            conn.close()
        caches = sorted((Path(h.host_dir) / "cache" / "qemu" / "capabilities").glob("*.xml"))
        if not caches:
            raise errors.LabError(f"{host_name}: libvirt cached no QEMU capabilities")
        path = caches[0]
        text = path.read_text()
        start = text.index("<hostCPU type='kvm'")
        end = text.index("</hostCPU>", start)
        section = text[start:end]
        for feature in features:
            pattern = re.compile(rf"<property name='{re.escape(feature)}' type='boolean' [^/]*/>")
            if not pattern.search(section):
                raise errors.LabError(f"{host_name}: no KVM host CPU property {feature!r}")
            section = pattern.sub(
                f"<property name='{feature}' type='boolean' value='false'/>", section
            )
        path.write_text(text[:start] + section + text[end:])
        self.restart_libvirtd(host_name)
        return path

    def qemu_pids(self, host_name: str) -> list[tuple[str, int]]:
        """(guest, pid) of every QEMU process the host's libvirtd runs, from its pid files."""
        return _qemu_pids_of_host(self._record(host_name))

    def kill_qemu(self, host_name: str, guest: str, grace_s: float = 5.0) -> int | None:
        """Stop the QEMU process of one guest on one host (SIGTERM, then SIGKILL).

        For a guest libvirt cannot destroy because a job holds it, e.g. an incoming copy a
        restarted libvirtd is still reconnecting to: the daemon sees its monitor close and
        forgets the domain. Returns the pid stopped, or None when none ran.
        """
        for name, pid in _qemu_pids_of_host(self._record(host_name)):
            if name != guest:
                continue
            rec = record_process(Role.QEMU, host_name, pid, name)
            if rec is not None and stop_process(rec, grace_s=grace_s):
                return pid
        return None

    def _record(self, host_name: str) -> HostRecord:
        for h in self._state.hosts:
            if h.name == host_name:
                return h
        raise KeyError(host_name)

    # ---- teardown -----------------------------------------------------------------------

    def down(self) -> list[str]:
        return down(self._store.state_dir)


def down(state_dir: Path) -> list[str]:
    """Stop everything a lab recorded and remove its state; returns what was done."""
    store = StateStore(state_dir)
    if not store.exists():
        return [f"no lab state in {state_dir}: nothing to stop"]
    with store.locked():
        done = _teardown(store, store.load())
    store.remove_dir()
    return done


def _qemu_pids_of_host(host: HostRecord) -> list[tuple[str, int]]:
    """QEMU processes a lab daemon started, from the pid files in its private run dir."""
    found = []
    for pid_file in sorted((host.run_dir / "qemu").glob("*.pid")):
        guest = pid_file.stem
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if (
            cmdline
            and cmdline[0].endswith(b"qemu-system-x86_64")
            and f"guest={guest},".encode() in b" ".join(cmdline)
        ):
            found.append((guest, pid))
    return found


def _daemon_alive(state: LabState, h: HostRecord) -> bool:
    daemon = state.process(Role.LIBVIRTD, h.name)
    return daemon is not None and daemon.is_alive()


def _destroy_guests(h: HostRecord) -> list[str]:
    """Destroy (and undefine) every guest of one lab daemon, in parallel."""
    conn = _try_open(h.uri)
    if conn is None:
        return []

    def destroy(dom: libvirt.virDomain) -> str:
        try:
            name: str = dom.name()
            persistent = dom.isPersistent()
            if dom.isActive():
                dom.destroy()
            if persistent:
                dom.undefine()
            return f"destroyed guest {name} on {h.name}"
        except libvirt.libvirtError as exc:
            # A transient guest vanishes once destroyed, or its migration just ended.
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return ""
            # A guest stuck in a job (a migration whose peer died): its QEMU is killed by
            # pid below, with every other process the lab recorded or finds.
            LOG.warning("guest not destroyed through libvirt host=%s error=%s", h.name, exc)
            return ""

    try:
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"destroy/{h.name}") as pool:
            return [line for line in pool.map(destroy, conn.listAllDomains()) if line]
    finally:
        conn.close()


def _teardown(store: StateStore, state: LabState) -> list[str]:
    done = []
    state = dataclasses.replace(state, phase=Phase.STOPPING)
    store.save(state)
    for p in state.processes:
        if p.role is Role.AGENT and stop_process(p, grace_s=5.0):
            done.append(f"stopped agent of {p.host} (pid {p.pid})")
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="lab-destroy") as pool:
        # Destroying a guest takes about 2 s here (QEMU's exit): do them all at once.
        for lines in pool.map(_destroy_guests, [h for h in state.hosts if _daemon_alive(state, h)]):
            done.extend(lines)
    for h in state.hosts:
        for guest, pid in _qemu_pids_of_host(h):
            rec = record_process(Role.QEMU, h.name, pid, guest)
            if rec and stop_process(rec, grace_s=5.0):
                done.append(f"killed orphaned qemu of {guest} on {h.name} (pid {pid})")
    for p in state.processes:
        if p.role is Role.QEMU and stop_process(p, grace_s=5.0):
            done.append(f"killed qemu of {p.name} (pid {p.pid})")
    for p in state.processes:
        if p.role is Role.LIBVIRTD and stop_process(p):
            done.append(f"stopped libvirtd of {p.host} (pid {p.pid})")
    deleted = network.delete_netns([h.netns for h in state.hosts] + [state.switch_netns])
    done.extend(f"deleted network namespace {ns}" for ns in deleted)
    for h in state.hosts:
        shutil.rmtree(h.host_dir, ignore_errors=True)
    for sub in ("hosts", "serial", "guest"):
        shutil.rmtree(store.state_dir / sub, ignore_errors=True)
    store.remove()
    done.append(f"removed lab state in {store.state_dir}")
    return done


class _Starter:
    """One `up`: fresh, or over the record of a crashed lab when recovering."""

    def __init__(self, store: StateStore, config: LabConfig) -> None:
        self._store = store
        self._config = config
        self._phases: list[tuple[str, float]] = []
        self._t0 = time.monotonic()

    def _phase(self, name: str) -> None:
        now = time.monotonic()
        self._phases.append((name, round(now - self._t0, 2)))
        self._t0 = now

    def run(self, n_hosts: int, plans: list[GuestPlan], *, recover: bool) -> tuple[Lab, UpReport]:
        recovered: list[str] = []
        if self._store.exists():
            state = self._store.load()
            live = liveness(state)
            if state.phase is Phase.UP and not live.dead:
                raise errors.LabAlreadyRunning(self._store.state_dir, [p.pid for p in live.alive])
            if not recover:
                raise errors.LabCrashed(
                    self._store.state_dir,
                    [f"{p.role.value}/{p.host}/{p.pid}" for p in live.dead]
                    or [f"phase={state.phase.value}"],
                    [p.pid for p in live.alive],
                )
            recovered = [f"{p.role.value} of {p.host}" for p in live.dead]
            accel_reason = "recorded by the crashed lab"
            notes = list(state.setup_notes)
            plans = []  # the recorded guests are authoritative when recovering
        else:
            if n_hosts < 1:
                raise errors.LabError(f"n_hosts={n_hosts} must be at least 1")
            for plan in plans:
                if plan.host_index is not None and not 0 <= plan.host_index < n_hosts:
                    raise errors.SpecError(
                        None, f"guest {plan.spec.name}: no lab host {plan.host_index}"
                    )
            state, accel_reason, notes = self._fresh_state(n_hosts, plans)
        self._phase("prepare")

        network.create_switch(state.switch_netns, state.bridge)
        prefix_len = ipaddress.IPv4Network(state.subnet).prefixlen
        for h in state.hosts:
            link = network.HostLink(h.netns, f"p{h.index}", h.address, prefix_len)
            network.attach_host(state.switch_netns, state.bridge, link, state.rate_mbit)
        self._phase("network")

        for h in state.hosts:
            state = self._ensure_daemon(state, h)
        self._phase("libvirtd")
        self._probe_qemu(state)
        self._phase("qemu-probe")

        state = self._choose_cpu(state)
        state = self._ensure_guests(state)
        self._phase("guests")
        if self._config.wait_guests:
            Lab(self._store, state).wait_guests_ready(self._config.guest_ready_timeout_s)
            self._phase("guests-ready")

        failures: list[str] = []
        if state.agents:
            for h in state.hosts:
                state, failure = self._ensure_agent(state, h)
                if failure:
                    failures.append(failure)
        state = dataclasses.replace(state, phase=Phase.UP, agent_failures=tuple(failures))
        self._store.save(state)
        self._phase("agents")
        report = UpReport(
            accel=state.accel,
            accel_reason=accel_reason,
            cpu_model=state.cpu_model,
            setup_notes=tuple(notes),
            agent_failures=tuple(failures),
            recovered=tuple(recovered),
            phases_s=tuple(self._phases),
        )
        return Lab(self._store, state), report

    def _fresh_state(self, n_hosts: int, plans: list[GuestPlan]) -> tuple[LabState, str, list[str]]:
        cfg = self._config
        subnet = ipaddress.IPv4Network(cfg.subnet)
        network.check_subnet_free(subnet)
        names = [f"{cfg.prefix}-h{i}" for i in range(n_hosts)]
        taken = network.list_netns() & {*names, f"{cfg.prefix}-sw"}
        if taken:
            raise errors.LabError(
                f"network namespaces {sorted(taken)} exist but no lab state is in "
                f"{cfg.state_dir}: another lab uses prefix {cfg.prefix!r}"
            )
        notes = prepare_machine()
        if cfg.force_tcg:
            accel, accel_reason = domains.Accel.TCG, "TCG forced by the lab's configuration"
        else:
            accel, accel_reason = domains.detect_accel()
        state_dir = cfg.state_dir.resolve()
        kernel: Path = cfg.kernel or build_guest(state_dir / "guest")
        hosts = []
        for i, name in enumerate(names):
            port = cfg.agent_port_base + i if cfg.agent_port_base else _free_port()
            hosts.append(
                HostRecord(
                    name=name,
                    index=i,
                    netns=name,
                    address=network.host_address(subnet, i),
                    host_dir=str(state_dir / "hosts" / name),
                    uuid=str(uuid.uuid4()),
                    agent_port=port,
                )
            )
        # KVM guests run on the host's TSC: tell them its rate instead of letting
        # them calibrate it against the RTC, which a loaded host gets wrong.
        khz = domains.host_tsc_khz() if accel is domains.Accel.KVM else None
        tsc = f" tsc_khz={khz}" if khz else ""
        guests = []
        for k, plan in enumerate(plans):
            index = k % n_hosts if plan.host_index is None else plan.host_index
            guests.append(
                GuestRecord(
                    name=plan.spec.name,
                    memory_mib=plan.spec.memory_mib,
                    cmdline=guest_cmdline(plan.spec) + tsc,
                    initial_host=names[index],
                    serial_path=str(state_dir / "serial" / f"{plan.spec.name}.log"),
                )
            )
        state = LabState(
            prefix=cfg.prefix,
            state_dir=str(state_dir),
            subnet=str(subnet),
            rate_mbit=cfg.rate_mbit,
            accel=accel.value,
            cpu_model="",
            kernel=str(kernel),
            switch_netns=f"{cfg.prefix}-sw",
            bridge=f"{cfg.prefix}-br",
            agents=cfg.agents,
            phase=Phase.STARTING,
            hosts=tuple(hosts),
            guests=tuple(guests),
            setup_notes=tuple(notes),
        )
        self._store.save(state)
        return state, accel_reason, notes

    def _write_host_config(self, h: HostRecord) -> None:
        base = Path(h.host_dir)
        for sub in MOUNT_POINTS:
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "lib" / "qemu").mkdir(exist_ok=True)
        (base / "etc" / "libvirtd.conf").write_text(
            f'host_uuid = "{h.uuid}"\nlog_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
        )
        (base / "etc" / "qemu.conf").write_text(
            'user = "root"\n'
            'group = "root"\n'
            'security_driver = "none"\n'
            'stdio_handler = "file"\n'
            "remember_owner = 0\n"
            # The address a migration stream to this host uses when the source names
            # none (as Nova's libvirt driver does without live_migration_inbound_addr).
            f'migration_host = "{h.address}"\n'
        )

    def _ensure_daemon(self, state: LabState, h: HostRecord) -> LabState:
        rec = state.process(Role.LIBVIRTD, h.name)
        if rec and rec.is_alive():
            return state
        self._write_host_config(h)
        base = Path(h.host_dir)
        binds = "; ".join(
            f"mount --bind {shlex.quote(str(base / sub))} {target}"
            for sub, target in MOUNT_POINTS.items()
        )
        # Its own UTS namespace too, so each lab host reports its own hostname.
        script = (
            f"set -e; hostname {shlex.quote(h.name)}; {cgroup_mounts()}{binds}; "
            f"exec {LIBVIRTD} --pid-file {shlex.quote(str(base / 'libvirtd.pid'))}"
        )
        cmd = ["ip", "netns", "exec", h.netns, "unshare", "--mount", "--uts"]
        cmd += ["--propagation", "private"]
        out_path = base / "libvirtd.out"
        with out_path.open("ab") as out:
            proc = subprocess.Popen(
                [*cmd, "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        rec = record_process(Role.LIBVIRTD, h.name, proc.pid)
        if rec is None:
            raise errors.HostStartFailed(h.name, "exited at once", out_path)
        state = state.with_process(rec)
        self._store.save(state)
        LOG.info("started libvirtd host=%s pid=%d netns=%s", h.name, proc.pid, h.netns)

        def ready() -> bool:
            if proc.poll() is not None:
                return True
            conn = _try_open(h.uri)
            if conn is not None:
                conn.close()
                return True
            return False

        if not wait_until(ready, self._config.ready_timeout_s) or proc.poll() is not None:
            reason = (
                f"exited with {proc.returncode}"
                if proc.poll() is not None
                else f"not answering after {self._config.ready_timeout_s}s"
            )
            tail = _log_tail(out_path) or _log_tail(base / "log" / "libvirtd.log")
            raise errors.HostStartFailed(h.name, f"{reason}: {tail}", out_path)
        return state

    def _probe_qemu(self, state: LabState) -> None:
        """Have every daemon probe QEMU's capabilities at once (seconds each, else serial)."""
        accel = domains.Accel(state.accel)

        def probe(h: HostRecord) -> None:
            conn = _open(h.uri)
            try:
                conn.getDomainCapabilities(QEMU, "x86_64", "pc", accel.domain_type)
            finally:
                conn.close()

        threads = [
            threading.Thread(target=probe, args=(h,), name=f"probe/{h.name}") for h in state.hosts
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _choose_cpu(self, state: LabState) -> LabState:
        if state.cpu_model or state.guests == ():
            return state
        accel = domains.Accel(state.accel)
        conn = _open(state.hosts[0].uri)
        try:
            caps = conn.getDomainCapabilities(QEMU, "x86_64", "pc", accel.domain_type)
        finally:
            conn.close()
        model = domains.choose_cpu_model(caps)
        LOG.info("cpu model=%s accel=%s", model or "(qemu default)", accel.value)
        return dataclasses.replace(state, cpu_model=model)

    def _ensure_guests(self, state: LabState) -> LabState:
        """Boot every recorded guest that runs nowhere, all at once (each takes seconds)."""
        lab = Lab(self._store, state)
        (Path(state.state_dir) / "serial").mkdir(parents=True, exist_ok=True)
        missing = [g for g in state.guests if not lab.running_on(g.name)]
        hosts = {h.name: h for h in state.hosts}

        def boot(g: GuestRecord) -> None:
            host = hosts[g.initial_host]
            cfg = domains.DomainConfig(
                name=g.name,
                memory_mib=g.memory_mib,
                kernel=Path(state.kernel),
                cmdline=g.cmdline,
                serial_path=Path(g.serial_path),
                accel=domains.Accel(state.accel),
                cpu_model=state.cpu_model,
            )
            conn = _open(host.uri)
            try:
                conn.createXML(domains.domain_xml(cfg), 0)
            except libvirt.libvirtError as exc:
                raise errors.GuestStartFailed(g.name, host.name, str(exc)) from exc
            finally:
                conn.close()
            LOG.info("started guest=%s host=%s", g.name, host.name)

        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="lab-boot") as pool:
            futures = [pool.submit(boot, g) for g in missing]
        for h in state.hosts:
            for guest, pid in _qemu_pids_of_host(h):
                rec = record_process(Role.QEMU, h.name, pid, guest)
                if rec and state.process(Role.QEMU, h.name, guest) != rec:
                    state = state.with_process(rec)
        self._store.save(state)
        for future in futures:
            future.result()  # the first boot failure, once every started QEMU is recorded
        return state

    def _agent_binary(self) -> str | None:
        if self._config.agent_binary:
            return self._config.agent_binary
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        return shutil.which("hostmaint-agent", path=path)

    def _ensure_agent(self, state: LabState, h: HostRecord) -> tuple[LabState, str]:
        rec = state.process(Role.AGENT, h.name)
        if rec and rec.is_alive():
            return state, ""
        binary = self._agent_binary()
        if binary is None:
            return state, f"agent of {h.name}: hostmaint-agent not found"
        conf = Path(h.host_dir) / "agent.conf"
        peers = [p for p in state.hosts if p.name != h.name]
        conf.write_text(
            "[DEFAULT]\n"
            f"host = {h.name}\n"
            "[libvirt]\n"
            f"uri = {h.uri}\n"
            f"migration_address = {h.address}\n"
            "[grpc]\n"
            f"listen = 127.0.0.1:{h.agent_port}\n"
            "insecure = true\n"
            "[migration]\n"
            f"allowed_destinations = {','.join(p.uri for p in peers)}\n"
            f"allowed_migration_hosts = {','.join(p.address for p in peers)}\n"
            f"stale_incoming_grace_s = {STALE_INCOMING_GRACE_S}\n"
        )
        out_path = Path(h.host_dir) / "agent.log"
        with out_path.open("ab") as out:
            proc = subprocess.Popen(
                [binary, "--config-file", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        new = record_process(Role.AGENT, h.name, proc.pid)
        if new is not None:
            state = state.with_process(new)
            self._store.save(state)
        ok = wait_until(
            lambda: proc.poll() is not None or _port_open(h.agent_port),
            self._config.agent_ready_timeout_s,
        )
        if proc.poll() is not None:
            # It exited: nothing of it to stop later, and its absence is not a crash.
            state = dataclasses.replace(
                state, processes=tuple(p for p in state.processes if p != new)
            )
            self._store.save(state)
            return state, (
                f"agent of {h.name}: exited with {proc.returncode}: {_log_tail(out_path, 3)} "
                f"(log: {out_path})"
            )
        if not ok:
            return state, (
                f"agent of {h.name}: port {h.agent_port} not open after "
                f"{self._config.agent_ready_timeout_s}s (log: {out_path})"
            )
        LOG.info("started agent host=%s pid=%d port=%d", h.name, proc.pid, h.agent_port)
        return state, ""


__all__ = [
    "GuestPlan",
    "Lab",
    "LabConfig",
    "LabHost",
    "UpReport",
    "down",
    "load_guest_plans",
    "start_ticks_of",
]
