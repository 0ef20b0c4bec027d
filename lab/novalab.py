"""Nova, with its own libvirt driver, on a running lab: start it, boot servers, read them.

`lab/nova_server.py --driver libvirt` runs in Nova's virtualenv (see
`lab/nova_libvirt.py` for what differs from a deployment); this module is
its other half, on the project's side: it writes the host map, starts the
process with a nova.conf profile, creates flavors, boots each lab guest as a
server through Nova's API (the guest kind is an image whose
``os_command_line`` carries its parameters) and reads what each guest says
on its serial console, which Nova logs to ``<instance dir>/console.log``.

Profiles are nova.conf options, passed as ``--flag GROUP.NAME=VALUE``;
``mode1`` and ``mode2`` are docs/nova.md's two modes.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import requests

from . import cluster, domains, integrity
from .demo import last_downtime_ms
from .guest import GuestEvent, GuestReady, GuestSpec, GuestVerify, guest_cmdline, parse_serial

REPO = Path(__file__).resolve().parents[1]
NOVA_VENV = REPO / os.environ.get("HOSTMAINT_NOVA_VENV", ".venv-nova")
ADMIN_HEADERS = {
    "X-Auth-User": "admin",
    "X-Auth-Project-Id": "hostmaint-admin",
    "X-Roles": "admin,member,reader",
    "OpenStack-API-Version": "compute 2.80",
}
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
ACTIVE_MIGRATION = (
    "accepted",
    "queued",
    "pre-migrating",
    "preparing",
    "running",
    "running (post-copy)",
    "post-migrating",
)

_MODES_COMMON = (
    "max_concurrent_live_migrations=4",
    "libvirt.live_migration_permit_post_copy=true",
    "libvirt.live_migration_permit_auto_converge=true",
    "libvirt.live_migration_downtime=500",
)
PROFILES: dict[str, tuple[str, ...]] = {
    # Nova's own defaults, untouched.
    "defaults": (),
    # What an operator hardens Nova alone with.
    "hardened": (
        "libvirt.live_migration_permit_post_copy=true",
        "libvirt.live_migration_permit_auto_converge=true",
        "libvirt.live_migration_timeout_action=force_complete",
    ),
    # docs/nova.md, mode 1: Nova's steps and timeout stay, hostmaint tunes on top.
    "mode1": (
        *_MODES_COMMON,
        "libvirt.live_migration_downtime_steps=10",
        "libvirt.live_migration_downtime_delay=75",
        "libvirt.live_migration_completion_timeout=800",
        "libvirt.live_migration_timeout_action=abort",
    ),
    # docs/nova.md, mode 2: hostmaint owns the escalation.
    "mode2": (
        *_MODES_COMMON,
        "libvirt.live_migration_downtime_steps=3",
        "libvirt.live_migration_downtime_delay=1000",
        "libvirt.live_migration_completion_timeout=0",
    ),
}


def host_cpu_runs_on_kvm(uri: str) -> bool:
    """Whether this host's KVM can run a guest with the host's own CPU, as libvirt sees it.

    Nova checks exactly that before a live migration of an instance without a CPU
    model. Nested (KVM in a VM), the host CPU has features KVM does not offer.
    """
    conn = libvirt.open(uri)
    try:
        caps = conn.getCapabilities()
        start, end = caps.index("<cpu>"), caps.index("</cpu>") + len("</cpu>")
        host_cpu = caps[start:end]
        result = conn.compareHypervisorCPU(None, "x86_64", None, "kvm", host_cpu, 0)
        return bool(result > 0)
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()


def _libvirt_python_dir(work: Path) -> Path:
    """The project's libvirt bindings, linked into a folder of their own for Nova's venv."""
    src = Path(libvirt.__file__).resolve().parent
    folder = work / "libvirt-python"
    folder.mkdir(exist_ok=True)
    for item in src.iterdir():
        if item.name == "libvirt.py" or item.name.startswith("libvirtmod."):
            link = folder / item.name
            if not link.exists():
                link.symlink_to(item)
    return folder


@dataclass
class Server:
    id: str
    name: str
    instance_name: str
    spec: GuestSpec


@dataclass
class NovaLab:
    """One Nova process over one lab, and the servers booted through it."""

    lab: cluster.Lab
    work: Path
    profile: str
    proc: subprocess.Popen[bytes]
    url: str
    images: dict[str, str]
    instances_path: Path
    log_path: Path
    http: requests.Session = field(default_factory=requests.Session)
    servers: dict[str, Server] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        lab: cluster.Lab,
        work: Path,
        specs: list[GuestSpec],
        profile: str = "defaults",
        extra_flags: tuple[str, ...] = (),
    ) -> NovaLab:
        state = lab.state
        khz = domains.host_tsc_khz() if state.accel == domains.Accel.KVM.value else None
        tsc = f" tsc_khz={khz}" if khz else ""
        instances = work / "instances"
        config = {
            "hosts": {h.name: {"uri": h.uri} for h in lab.hosts},
            "live_migration_uri": (
                f"qemu+unix:///system?socket={state.state_dir}/hosts/%s/run/libvirt-sock"
            ),
            "instances_path": str(instances),
            "virt_type": "kvm" if state.accel == domains.Accel.KVM.value else "qemu",
            "cpu_model": state.cpu_model,
            "skip_cpu_compare_on_dest": not host_cpu_runs_on_kvm(lab.hosts[0].uri),
            "kernel": state.kernel,
            "images": [{"name": s.name, "os_command_line": guest_cmdline(s) + tsc} for s in specs],
            "libvirt_python_dir": str(_libvirt_python_dir(work)),
        }
        config_path = work / "nova-lab.json"
        config_path.write_text(json.dumps(config, indent=1))
        log_path = work / f"nova-{profile}.log"
        flags = [arg for flag in (*PROFILES[profile], *extra_flags) for arg in ("--flag", flag)]
        proc, info, _ = launch(
            work,
            [
                *("--driver", "libvirt", "--lab-config", str(config_path)),
                *flags,
                *(h.name for h in lab.hosts),
            ],
            log_path,
            work / f"nova-{profile}.stderr",
        )
        nova = cls(
            lab=lab,
            work=work,
            profile=profile,
            proc=proc,
            url=f"http://127.0.0.1:{info['port']}/v2.1",
            images={i["name"]: i["id"] for i in info["images"]},
            instances_path=instances,
            log_path=log_path,
        )
        nova.http.headers.update(ADMIN_HEADERS)
        return nova

    def stop(self) -> None:
        self.http.close()
        stop(self.proc)

    # -- the API ---------------------------------------------------------------

    def get(self, path: str, **params: Any) -> Any:
        resp = self.http.get(f"{self.url}{path}", params=params or None)
        resp.raise_for_status()
        return resp.json()

    def post(self, path: str, body: Any) -> requests.Response:
        return self.http.post(f"{self.url}{path}", json=body)

    def flavor(self, memory_mib: int) -> str:
        name = f"lab-{memory_mib}"
        for f in self.get("/flavors")["flavors"]:
            if f["name"] == name:
                return str(f["id"])
        resp = self.post(
            "/flavors", {"flavor": {"name": name, "ram": memory_mib, "vcpus": 1, "disk": 1}}
        )
        resp.raise_for_status()
        return str(resp.json()["flavor"]["id"])

    def boot(self, spec: GuestSpec, host: str, timeout_s: float = 120.0) -> Server:
        """A server of the guest kind `spec` on `host`, once Nova says it is ACTIVE."""
        body = {
            "server": {
                "name": spec.name,
                "imageRef": self.images[spec.name],
                "flavorRef": self.flavor(spec.memory_mib),
                "networks": "none",
                "availability_zone": f"nova:{host}",
            }
        }
        resp = self.post("/servers", body)
        resp.raise_for_status()
        server_id = str(resp.json()["server"]["id"])
        server = self.wait_server(server_id, {"ACTIVE"}, timeout_s)
        entry = Server(server_id, spec.name, server["OS-EXT-SRV-ATTR:instance_name"], spec)
        self.servers[spec.name] = entry
        return entry

    def server(self, server_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self.get(f"/servers/{server_id}")["server"]
        return body

    def wait_server(self, server_id: str, statuses: set[str], timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            server = self.server(server_id)
            if server["status"] in statuses and server.get("OS-EXT-STS:task_state") is None:
                return server
            if server["status"] == "ERROR" or time.monotonic() > deadline:
                raise AssertionError(
                    f"server {server_id} is {server['status']} "
                    f"({server.get('fault')}), wanted {statuses}"
                )
            time.sleep(0.2)

    def action(self, server_id: str, body: dict[str, Any]) -> None:
        self.post(f"/servers/{server_id}/action", body).raise_for_status()

    def live_migrations(self, server_id: str) -> list[dict[str, Any]]:
        migrations = self.get("/os-migrations", instance_uuid=server_id)["migrations"]
        return [m for m in migrations if m["migration_type"] == "live-migration"]

    def delete(self, server_id: str) -> None:
        self.http.delete(f"{self.url}/servers/{server_id}")

    # -- the guests ------------------------------------------------------------

    def console_text(self, server: Server) -> str:
        path = self.instances_path / server.id / "console.log"
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def console(self, server: Server) -> list[GuestEvent]:
        return parse_serial(self.console_text(server))

    def verify_memory(
        self, servers: list[Server], timeout_s: float = integrity.DEFAULT_TIMEOUT_S
    ) -> dict[str, GuestVerify]:
        """Each server's guest's own memory check, once a full sweep ran after this call
        (lab/integrity.py; the console log a migration's target reopened is fine)."""
        consoles = {s.name: functools.partial(self.console_text, s) for s in servers}
        return integrity.wait_verified(consoles, timeout_s)

    def wait_ready(self, servers: list[Server], timeout_s: float) -> dict[str, GuestReady]:
        """Each server's guest's ready line (its memory filled, its writer running)."""
        deadline = time.monotonic() + timeout_s
        ready: dict[str, GuestReady] = {}
        while True:
            for s in servers:
                if s.name not in ready:
                    found = [e for e in self.console(s) if isinstance(e, GuestReady)]
                    if found:
                        ready[s.name] = found[0]
            if len(ready) == len(servers):
                return ready
            if time.monotonic() > deadline:
                missing = [s.name for s in servers if s.name not in ready]
                raise AssertionError(f"guests not ready in {timeout_s} s: {missing}")
            time.sleep(0.5)

    def where(self, server: Server) -> list[str]:
        """The lab hosts on which the server's guest runs (not paused)."""
        return [h.name for h in self.lab.running_on(server.instance_name)]

    def downtime_ms(self, server: Server) -> float | None:
        """QEMU's real downtime of the server's last finished migration, where it runs."""
        return last_downtime_ms(self.lab, server.instance_name)

    def log_lines(self, needle: str) -> list[str]:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if needle in line]


class NovaStartError(RuntimeError):
    """lab/nova_server.py exited or was not ready in time (its stderr's tail, or its log)."""


def launch(
    work: Path, args: list[str], log_path: Path, stderr_path: Path
) -> tuple[subprocess.Popen[bytes], dict[str, Any], float]:
    """Starts lab/nova_server.py in Nova's virtualenv with ``args`` and waits for its ready
    file: the process, what the ready file says, and the seconds it took."""
    ready = work / f"{log_path.stem}-ready.json"
    ready.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    started = time.monotonic()
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            [
                str(NOVA_VENV / "bin" / "python"),
                str(REPO / "lab" / "nova_server.py"),
                *("--port", "0", "--ready-file", str(ready), "--log-file", str(log_path)),
                *args,
            ],
            cwd=work,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    while not ready.exists():
        if proc.poll() is not None:
            tail = stderr_path.read_text(errors="replace").strip().splitlines()[-15:]
            raise NovaStartError("Nova exited before it was ready:\n" + "\n".join(tail))
        if time.monotonic() - started > START_TIMEOUT_S:
            stop(proc)
            raise NovaStartError(f"Nova not ready in {START_TIMEOUT_S} s (log: {log_path})")
        time.sleep(0.1)
    return proc, json.loads(ready.read_text()), time.monotonic() - started


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT_S (a clean-up that hangs ignores SIGTERM)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
