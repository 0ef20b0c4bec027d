"""A drain lab on the real Nova: servers, agents on test:/// hosts, a coordinator over gRPC.

Servers are created through Nova's API; each host's agent runs on a test:///
node file whose domains carry the same uuids (and Nova metadata) as the
servers Nova placed there, so the coordinator's gather step finds libvirt
data for each server. test:/// runs no migration jobs: the source agent
cannot watch, and the coordinator follows Nova's migration record.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc

from hostmaint.agent.cmd import Agent
from hostmaint.coordinator.cmd import Coordinator
from hostmaint.coordinator.cmd import load_config as coordinator_config
from hostmaint.coordinator.journal import StepRow
from hostmaint.protos import coordinator_pb2 as cpb
from hostmaint.protos import coordinator_pb2_grpc
from tests.agent.nodexml import NovaMeta, TestDomain, write_node
from tests.coordinator.conftest import start_agent
from tests.ports import free_port

from .conftest import NovaAdmin

T = 30.0
HOLD = "hold"
MIGRATION_S = "hostmaint:migration_s"
MIGRATION_FAIL_S = "hostmaint:migration_fail_s"
ACTIVE_MIGRATION = ("accepted", "queued", "pre-migrating", "preparing", "running")

# Fast settings for tests: progress every 0.2 s, the agent gives up waiting
# for a libvirt job (test:/// has none) after 1 s.
BASE_DRAIN = {
    "poll_interval_s": 0.2,
    "watch_start_timeout_s": 1.0,
    "link_bandwidth_bytes_per_s": 1.25e9,
    "dirty_rate_window_s": 1,
}
# A held migration falls behind within seconds.
QUICK_STALL = {"stall_grace_s": 1.0, "stall_factor": 1.0, "escalation_settle_s": 1.5}


class DrainStream:
    """A Drain call read on its own thread; events kept for the test to wait on."""

    def __init__(self, stub: coordinator_pb2_grpc.CoordinatorStub, request: cpb.DrainRequest):
        self.events: list[cpb.DrainEvent] = []
        self.error: grpc.RpcError | None = None
        self._cond = threading.Condition()
        self._done = False
        self._call = stub.Drain(request, timeout=300)
        self._thread = threading.Thread(target=self._read, name="test-drain-stream", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._call:
                with self._cond:
                    self.events.append(event)
                    self._cond.notify_all()
        except grpc.RpcError as e:
            self.error = e
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def wait_for(
        self, pred: Callable[[cpb.DrainEvent], bool], timeout_s: float = T
    ) -> cpb.DrainEvent:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            index = 0
            while True:
                for event in self.events[index:]:
                    if pred(event):
                        return event
                index = len(self.events)
                left = deadline - time.monotonic()
                if self._done or left <= 0:
                    kinds = [cpb.DrainEventKind.Name(e.kind) for e in self.events]
                    raise AssertionError(f"event not seen (error={self.error}); events: {kinds}")
                self._cond.wait(min(left, 0.5))

    def finished(self, timeout_s: float = 90.0) -> cpb.DrainEvent:
        """The FINISHED event; the stream must end right after it."""
        event = self.wait_for(lambda e: e.kind == cpb.DRAIN_EVENT_KIND_FINISHED, timeout_s)
        self._thread.join(T)
        assert not self._thread.is_alive(), "the Drain stream went on after FINISHED"
        assert self.error is None, self.error
        return event

    def kinds(self, vm_uuid: str | None = None) -> list[str]:
        with self._cond:
            events = list(self.events)
        return [
            cpb.DrainEventKind.Name(e.kind).removeprefix("DRAIN_EVENT_KIND_")
            for e in events
            if vm_uuid is None or e.vm_uuid == vm_uuid
        ]

    def cancel(self) -> None:
        self._call.cancel()
        self._thread.join(T)


@dataclass
class DrainLab:
    """One test's world: its servers, its agents, its coordinator(s)."""

    admin: NovaAdmin
    tmp: Path
    servers: list[str] = field(default_factory=list)
    agents: dict[str, Agent] = field(default_factory=dict)
    coordinator: Coordinator | None = None
    channel: grpc.Channel | None = None
    stub: coordinator_pb2_grpc.CoordinatorStub | None = None
    db_path: Path | None = None
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)  # spawned coordinators by name

    @property
    def url(self) -> str:
        return self.admin.nova.url

    # -- Nova side ----------------------------------------------------------------

    def server(
        self, host: str = "host1", migration_s: str | float | None = None, flavor: str = "1"
    ) -> str:
        metadata = {MIGRATION_S: str(migration_s)} if migration_s is not None else {}
        server_id = self.admin.create_server(host, flavor=flavor, metadata=metadata)
        self.servers.append(server_id)
        return server_id

    def host_of(self, server_id: str) -> str:
        return str(self.admin.server(server_id)["OS-EXT-SRV-ATTR:host"])

    def service(self, host: str) -> dict[str, Any]:
        resp = self.admin.http.get(
            f"{self.url}/os-services", params={"binary": "nova-compute", "host": host}
        )
        resp.raise_for_status()
        services: list[dict[str, Any]] = resp.json()["services"]
        assert len(services) == 1, services
        return services[0]

    def live_migrations(self, server_id: str) -> list[dict[str, Any]]:
        return [
            m for m in self.admin.migrations(server_id) if m["migration_type"] == "live-migration"
        ]

    # -- agents and coordinator -------------------------------------------------------

    def start_agents(self, hosts: tuple[str, ...]) -> None:
        """One agent per host on a node file of the servers Nova has there now."""
        domains: dict[str, list[TestDomain]] = {h: [] for h in hosts}
        for server_id in self.servers:
            s = self.admin.server(server_id)
            host = s["OS-EXT-SRV-ATTR:host"]
            if host not in domains:
                continue
            flavor = s["flavor"]
            domains[host].append(
                TestDomain(
                    name=s["OS-EXT-SRV-ATTR:instance_name"],
                    uuid=server_id,
                    memory_mib=int(flavor["ram"]),
                    vcpus=int(flavor["vcpus"]),
                    nova=NovaMeta(s["name"], flavor["original_name"], s["tenant_id"], s["user_id"]),
                )
            )
        for host in hosts:
            node = write_node(self.tmp / f"{host}.xml", domains[host])
            self.agents[host] = start_agent(node)

    def start_coordinator(
        self, endpoint: str | None = None, drain: dict[str, float] | None = None
    ) -> Coordinator:
        conf = coordinator_config([])
        conf.set_override("listen", "127.0.0.1:0", group="grpc")
        conf.set_override("grace_s", 0.5, group="grpc")
        self.db_path = self.db_path or self.tmp / "coordinator.db"
        conf.set_override("url", f"sqlite:///{self.db_path}", group="database")
        conf.set_override("name", "nova", group="driver")
        conf.set_override("endpoint", endpoint or self.url, group="nova")
        conf.set_override("noauth", True, group="nova")
        conf.set_override("timeout_s", 10.0, group="nova")
        conf.set_override(
            "hosts", {h: f"127.0.0.1:{a.port}" for h, a in self.agents.items()}, group="agents"
        )
        conf.set_override("timeout_s", 5.0, group="agents")
        for name, value in {**BASE_DRAIN, **(drain or {})}.items():
            conf.set_override(name, value, group="drain")
        coordinator = Coordinator(conf, threading.Event())
        coordinator.start()
        self.coordinator = coordinator
        if self.channel is not None:
            self.channel.close()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{coordinator.port}")
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)
        return coordinator

    def start(self, endpoint: str | None = None, drain: dict[str, float] | None = None) -> None:
        self.start_agents(("host1", "host2", "host3"))
        self.start_coordinator(endpoint, drain)

    def spawn_coordinator(
        self,
        endpoint: str | None = None,
        drain: dict[str, float] | None = None,
        *,
        name: str = "coordinator",
        db_url: str | None = None,
        extra: dict[str, dict[str, object]] | None = None,
    ) -> subprocess.Popen[bytes]:
        """hostmaint-coordinator in its own process (to be killed), serving a known port.

        `name` keeps several side by side (its config, log and entry in `ports`);
        `db_url` replaces the lab's SQLite journal; `extra` adds config sections
        (e.g. {"coordination": {...}}).
        """
        self.db_path = self.db_path or self.tmp / "coordinator.db"
        db_url = db_url or f"sqlite:///{self.db_path}"
        port = free_port()
        self.ports[name] = port
        agents = ",".join(f"{h}:127.0.0.1:{a.port}" for h, a in self.agents.items())
        settings = {**BASE_DRAIN, **(drain or {})}
        lines = [
            "[grpc]",
            f"listen = 127.0.0.1:{port}",
            "grace_s = 0.5",
            "[database]",
            f"url = {db_url}",
            "[driver]",
            "name = nova",
            "[nova]",
            f"endpoint = {endpoint or self.url}",
            "noauth = true",
            "timeout_s = 10",
            "[agents]",
            f"hosts = {agents}",
            "timeout_s = 5",
            "[drain]",
            *(f"{option} = {value}" for option, value in settings.items()),
        ]
        for section, options in (extra or {}).items():
            lines += [f"[{section}]", *(f"{k} = {v}" for k, v in options.items())]
        config = self.tmp / f"{name}.conf"
        config.write_text("\n".join(lines) + "\n")
        log_path = self.tmp / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "hostmaint.coordinator.cmd", "--config-file", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(proc)
        if self.channel is not None:
            self.channel.close()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        try:
            grpc.channel_ready_future(self.channel).result(timeout=T)
        except grpc.FutureTimeoutError:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise AssertionError(f"the coordinator did not serve in {T} s:\n{tail}") from None
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)
        return proc

    def kill_coordinator(self) -> None:
        """Stops the coordinator abruptly: no grace for calls, threads told to stop at once."""
        c = self.coordinator
        assert c is not None
        c.stopped.set()
        c.server.stop(0)
        c.registry.close()
        for run_id in c.executor.drain_ids():
            c.executor.wait(run_id, T)
        self.coordinator = None

    def drain(self, host: str = "host1", reason: str = "", **policy: Any) -> DrainStream:
        assert self.stub is not None
        request = cpb.DrainRequest(host=host, reason=reason, policy=cpb.DrainPolicy(**policy))
        return DrainStream(self.stub, request)

    def steps(self, drain_id: str, action: str | None = None) -> list[StepRow]:
        assert self.coordinator is not None
        return [
            s
            for s in self.coordinator.journal.steps(drain_id)
            if action is None or s.action == action
        ]

    # -- clean-up -----------------------------------------------------------------------

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.coordinator is not None:
            self.coordinator.stop()
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for agent in self.agents.values():
            agent.stop()
        self.abort_migrations()
        for server_id in self.servers:
            self.admin.delete_server(server_id)
        enable_all(self.admin)

    def abort_migrations(self) -> None:
        """Ends every live migration of this lab's servers still running."""
        for server_id in self.servers:
            for m in self.live_migrations(server_id):
                if m["status"] in ACTIVE_MIGRATION:
                    self.admin.http.delete(f"{self.url}/servers/{server_id}/migrations/{m['id']}")
        for server_id in self.servers:
            wait_until(partial(self._settled, server_id), 30.0, f"{server_id} settles")

    def _settled(self, server_id: str) -> bool:
        s = self.admin.server(server_id)
        return s.get("OS-EXT-STS:task_state") is None


def wait_until(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.1)


def enable_all(admin: NovaAdmin) -> None:
    resp = admin.http.get(f"{admin.nova.url}/os-services", params={"binary": "nova-compute"})
    resp.raise_for_status()
    for s in resp.json()["services"]:
        if s["status"] != "enabled":
            admin.http.put(
                f"{admin.nova.url}/os-services/{s['id']}", json={"status": "enabled"}
            ).raise_for_status()


def purge(admin: NovaAdmin) -> None:
    """Deletes every server left by earlier tests, so a drain moves only a test's own."""
    resp = admin.http.get(f"{admin.nova.url}/servers/detail", params={"all_tenants": "1"})
    resp.raise_for_status()
    ids = [s["id"] for s in resp.json()["servers"]]
    for server_id in ids:
        admin.delete_server(server_id)

    def gone() -> bool:
        r = admin.http.get(f"{admin.nova.url}/servers", params={"all_tenants": "1"})
        return not r.json()["servers"]

    wait_until(gone, 60.0, "all servers are deleted")
    enable_all(admin)


def lab_fixture(admin: NovaAdmin, tmp: Path) -> Iterator[DrainLab]:
    lab = DrainLab(admin, tmp)
    try:
        yield lab
    finally:
        lab.close()
