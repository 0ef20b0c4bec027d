"""A real Nova control plane for the `nova` driver's tests.

The session fixture `nova` creates Nova's own virtualenv (scripts/nova-venv.sh;
the tests are skipped, with the reason, only when it cannot be created, e.g.
no access to the package index), starts lab/nova_server.py in it with three
compute hosts, waits for its ready file and stops it at the end.
"""

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from hostmaint.lab import novalab
from hostmaint.lab.faultproxy import FaultProxy

REPO = Path(__file__).resolve().parents[2]
HOSTS = ("host1", "host2", "host3")
ADMIN_HEADERS = {
    "X-Auth-User": "admin",
    "X-Auth-Project-Id": "hostmaint-admin",
    "X-Roles": "admin,member,reader",
}


@dataclass(frozen=True)
class NovaProcess:
    """The running Nova: where it listens and what it started with."""

    url: str
    port: int
    pid: int
    hosts: tuple[str, ...]
    image_id: str
    flavors: tuple[dict[str, Any], ...]
    startup_s: float
    rss_bytes: int
    log_path: Path


def ensure_venv() -> None:
    try:
        result = subprocess.run(
            ["bash", str(REPO / "scripts" / "nova-venv.sh")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("Nova's virtualenv could not be created in 900 s")
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        pytest.skip("Nova's virtualenv could not be created: " + " | ".join(tail))


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="session")
def nova(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NovaProcess]:
    ensure_venv()
    workdir = tmp_path_factory.mktemp("hm-nova")
    log_path = workdir / "nova.log"
    try:
        proc, info, startup_s = novalab.launch(
            workdir, list(HOSTS), log_path, workdir / "nova.stderr"
        )
    except novalab.NovaStartError as e:
        pytest.fail(str(e))
    try:
        process = NovaProcess(
            url=f"http://127.0.0.1:{info['port']}/v2.1",
            port=int(info["port"]),
            pid=proc.pid,
            hosts=tuple(info["hosts"]),
            image_id=info["image_id"],
            flavors=tuple(info["flavors"]),
            startup_s=startup_s,
            rss_bytes=int(info["rss_bytes"]),
            log_path=log_path,
        )
        print(
            f"\nnova: started hosts={','.join(process.hosts)} port={process.port} "
            f"startup_s={process.startup_s:.2f} (in-process {info['startup_s']:.2f}, "
            f"of which imports {info['import_s']:.2f}) "
            f"rss_mib={process.rss_bytes / 2**20:.0f}"
        )
        yield process
        print(f"\nnova: rss_mib_at_end={_rss_bytes(proc.pid) / 2**20:.0f}")
    finally:
        stopping = time.monotonic()
        novalab.stop(proc)
        print(f"\nnova: stopped stop_s={time.monotonic() - stopping:.2f}")


class NovaAdmin:
    """Test-side setup through Nova's API: servers in chosen projects and hosts."""

    def __init__(self, nova: NovaProcess, microversion: str = "2.80") -> None:
        self.nova = nova
        self.http = requests.Session()
        self.http.headers.update(ADMIN_HEADERS)
        self.http.headers["OpenStack-API-Version"] = f"compute {microversion}"

    def _as(self, project: str) -> dict[str, str]:
        return {"X-Auth-Project-Id": project}

    def create_server(
        self,
        host: str,
        project: str = "hostmaint-admin",
        flavor: str = "1",
        metadata: dict[str, str] | None = None,
        name: str | None = None,
    ) -> str:
        body = {
            "server": {
                "name": name or f"vm-{uuid.uuid4().hex[:8]}",
                "imageRef": self.nova.image_id,
                "flavorRef": flavor,
                "networks": "none",
                "availability_zone": f"nova:{host}",
                "metadata": metadata or {},
            }
        }
        resp = self.http.post(f"{self.nova.url}/servers", json=body, headers=self._as(project))
        resp.raise_for_status()
        server_id: str = resp.json()["server"]["id"]
        self.wait_server(server_id, {"ACTIVE"})
        return server_id

    def server(self, server_id: str) -> dict[str, Any]:
        resp = self.http.get(f"{self.nova.url}/servers/{server_id}")
        resp.raise_for_status()
        server: dict[str, Any] = resp.json()["server"]
        return server

    def wait_server(
        self, server_id: str, statuses: set[str], timeout_s: float = 30.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            server = self.server(server_id)
            if server["status"] in statuses and server.get("OS-EXT-STS:task_state") is None:
                return server
            if server["status"] == "ERROR" or time.monotonic() > deadline:
                raise AssertionError(f"server {server_id} is {server['status']}, wanted {statuses}")
            time.sleep(0.1)

    def action(self, server_id: str, body: dict[str, Any]) -> None:
        resp = self.http.post(f"{self.nova.url}/servers/{server_id}/action", json=body)
        resp.raise_for_status()

    def create_server_group(self, policy: str, project: str = "hostmaint-admin") -> str:
        body = {"server_group": {"name": f"sg-{policy}", "policy": policy}}
        resp = self.http.post(
            f"{self.nova.url}/os-server-groups", json=body, headers=self._as(project)
        )
        resp.raise_for_status()
        group_id: str = resp.json()["server_group"]["id"]
        return group_id

    def migrations(self, server_id: str) -> list[dict[str, Any]]:
        resp = self.http.get(f"{self.nova.url}/os-migrations", params={"instance_uuid": server_id})
        resp.raise_for_status()
        migrations: list[dict[str, Any]] = resp.json()["migrations"]
        return migrations

    def delete_server(self, server_id: str) -> None:
        self.http.delete(f"{self.nova.url}/servers/{server_id}")


@pytest.fixture
def nova_admin(nova: NovaProcess) -> Iterator[NovaAdmin]:
    admin = NovaAdmin(nova)
    yield admin
    admin.http.close()


@pytest.fixture
def fault_proxy(nova: NovaProcess) -> Iterator[FaultProxy]:
    proxy = FaultProxy("127.0.0.1", nova.port)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def pytest_configure(config: pytest.Config) -> None:
    # openstacksdk 4.7 warns about its own internal call on every request.
    config.addinivalue_line("filterwarnings", "ignore:The 'service_type' parameter is unnecesary")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "nova" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.nova)
