"""Two coordinators, one journal, one etcd: the standby takes over a drain from a killed leader.

Coordinators A and B run as processes (`hostmaint-coordinator`) with the
`nova` driver against the session's real Nova, on one PostgreSQL journal and
one etcd coordination group. A leads and drains host1; B stands by (its gRPC
health NOT_SERVING, a Drain sent to it refused with UNAVAILABLE). A is killed
with SIGKILL at a chosen point of the drain; B must become the leader when
A's leases lapse, resume the drain from the journal and complete it, moving
every server exactly once (Nova's migration records) and starting no
migration twice (the journal's steps). The takeover times are printed, one
table row per kill point.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hostmaint.coordinator.journal import Journal, make_engine
from hostmaint.protos import coordinator_pb2 as cpb
from hostmaint.protos import coordinator_pb2_grpc
from tests.coordinator.pgcluster import BIN_GLOB, SERVER_USER, PostgresCluster, find_bindir
from tests.ha.etcdserver import ETCD, EtcdServer

from .conftest import HOSTS, NovaAdmin, NovaProcess
from .drainlab import ACTIVE_MIGRATION, DrainLab, DrainStream, T, lab_fixture, purge, wait_until

# Without etcd or PostgreSQL the module is not collected at all: its skip then
# does not count as a skipped `nova` test where only Nova is required.
if not os.access(ETCD, os.X_OK):
    pytest.skip(f"no {ETCD} (Debian package etcd-server)", allow_module_level=True)
if find_bindir() is None:
    pytest.skip(f"no PostgreSQL server under {BIN_GLOB}", allow_module_level=True)

pytestmark = [pytest.mark.nova, pytest.mark.postgres, pytest.mark.etcd]

LEASE_TTL_S = 3
HEARTBEAT_INTERVAL_S = 0.5  # 2 * 0.5 s + a 1 s request timeout <= the 3 s TTL
SERVERS = 4
MIGRATION_S = 3
SERVING = health_pb2.HealthCheckResponse.SERVING
FINISHED = (
    cpb.DRAIN_STATE_COMPLETED,
    cpb.DRAIN_STATE_INCOMPLETE,
    cpb.DRAIN_STATE_CANCELLED,
    cpb.DRAIN_STATE_FAILED,
)

_rows: list[tuple[str, float, float, int]] = []


@pytest.fixture(scope="module", autouse=True)
def clean_nova(nova: NovaProcess) -> None:
    admin = NovaAdmin(nova)
    try:
        purge(admin)
    finally:
        admin.http.close()


@pytest.fixture(scope="module", autouse=True)
def takeover_table() -> Iterator[None]:
    yield
    if _rows:
        print(
            f"\nHA takeover (lease_ttl_s={LEASE_TTL_S} heartbeat_interval_s="
            f"{HEARTBEAT_INTERVAL_S}, {SERVERS} servers of {MIGRATION_S} s, one at a time)"
        )
        print(
            f"{'kill point':<34} {'kill->B serving s':>17} {'kill->finished s':>16} {'repeated':>8}"
        )
        for point, serving_s, finished_s, repeated in _rows:
            print(f"{point:<34} {serving_s:>17.2f} {finished_s:>16.2f} {repeated:>8}")


@pytest.fixture(scope="module")
def etcd_server() -> Iterator[EtcdServer]:
    server = EtcdServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    bindir = find_bindir()
    assert bindir is not None
    try:
        cluster = PostgresCluster(bindir)
    except KeyError:
        pytest.skip(f"running as root and there is no {SERVER_USER!r} user to run PostgreSQL")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def lab(nova_admin: NovaAdmin, tmp_path: Path) -> Iterator[DrainLab]:
    yield from lab_fixture(nova_admin, tmp_path)


class Peer:
    """A spawned coordinator seen from the test: its process and its own channel."""

    def __init__(self, lab: DrainLab, name: str, db_url: str, coordination: dict[str, object]):
        self.name = name
        self.proc = lab.spawn_coordinator(
            name=name,
            db_url=db_url,
            extra={"coordination": {**coordination, "member_id": name}},
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{lab.ports[name]}")
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def serving(self) -> bool:
        answer = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=T)
        return bool(answer.status == SERVING)

    def drain_state(self) -> cpb.DrainState.ValueType:
        return self.stub.GetDrain(cpb.GetDrainRequest(host="host1"), timeout=T).state

    def close(self) -> None:
        self.channel.close()


@pytest.mark.parametrize("kill_after_starts", [0, 1, 3])
def test_standby_takes_over_a_drain_from_a_killed_leader(
    lab: DrainLab, etcd_server: EtcdServer, postgres: PostgresCluster, kill_after_starts: int
) -> None:
    vms = [lab.server(migration_s=MIGRATION_S) for _ in range(SERVERS)]
    lab.start_agents(HOSTS)
    db_url = postgres.create_database()
    coordination: dict[str, object] = {
        "backend_url": etcd_server.tooz_url,
        "group": f"hostmaint-test-{uuid.uuid4().hex[:12]}",
        "lease_ttl_s": LEASE_TTL_S,
        "heartbeat_interval_s": HEARTBEAT_INTERVAL_S,
    }
    engine = make_engine(db_url)
    peers: list[Peer] = []
    try:
        a = Peer(lab, "a", db_url, coordination)
        peers.append(a)
        wait_until(a.serving, T, "A leads and serves")
        b = Peer(lab, "b", db_url, coordination)
        peers.append(b)
        journal = Journal(engine, clock=time.time, upgrade=False)

        # B stands by: not serving, and a Drain sent to it is refused and recorded nowhere.
        standby_until = time.monotonic() + 2 * HEARTBEAT_INTERVAL_S
        while time.monotonic() < standby_until:
            assert not b.serving()
            time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as refused:
            list(b.stub.Drain(cpb.DrainRequest(host="host1"), timeout=T))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
        assert journal.latest_drain("host1") is None

        stream = DrainStream(
            a.stub,
            cpb.DrainRequest(host="host1", policy=cpb.DrainPolicy(max_parallel_per_source=1)),
        )
        started = stream.wait_for(lambda e: e.kind == cpb.DRAIN_EVENT_KIND_STARTED)
        if kill_after_starts:
            wait_until(
                lambda: stream.kinds().count("MIGRATION_STARTED") >= kill_after_starts,
                SERVERS * (MIGRATION_S + T),
                f"{kill_after_starts} migration(s) started",
            )
        a.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        a.proc.wait(T)
        stream.cancel()
        running = sum(
            1 for vm in vms for m in lab.live_migrations(vm) if m["status"] in ACTIVE_MIGRATION
        )

        wait_until(b.serving, 10 * LEASE_TTL_S, "B leads and serves")
        serving_s = time.monotonic() - killed
        wait_until(lambda: b.drain_state() in FINISHED, 90.0, "B finishes the drain")
        finished_s = time.monotonic() - killed

        status = b.stub.GetDrain(cpb.GetDrainRequest(host="host1"), timeout=T)
        assert status.drain_id == started.drain_id
        assert status.state == cpb.DRAIN_STATE_COMPLETED, status
        assert lab.service("host1")["status"] == "disabled"

        # Each server moved by exactly one live migration, through Nova.
        for vm in vms:
            records = lab.live_migrations(vm)
            assert [m["status"] for m in records] == ["completed"], (vm, records)
            server = lab.admin.server(vm)
            assert server["OS-EXT-SRV-ATTR:host"] == records[0]["dest_compute"] != "host1"
            assert server["status"] == "ACTIVE"

        # ... and the journal started each attempt once, with nothing left open.
        steps = journal.steps(status.drain_id)
        starts = Counter(
            (s.vm_uuid, s.detail["attempt"])
            for s in steps
            if s.action == "start_migration" and s.state == "done"
        )
        repeated = sum(n - 1 for n in starts.values())
        assert {vm for vm, _ in starts} == set(vms)
        assert repeated == 0, starts
        assert not [s for s in steps if s.state == "intent"]

        point = f"after {kill_after_starts} start(s), {running} running"
        _rows.append((point, serving_s, finished_s, repeated))
        print(
            f"\ntakeover kill_point={kill_after_starts} running_at_kill={running} "
            f"kill_to_serving_s={serving_s:.2f} kill_to_finished_s={finished_s:.2f} "
            f"start_steps={sum(starts.values())} repeated={repeated}"
        )
    finally:
        for peer in peers:
            peer.close()
        engine.dispose()
