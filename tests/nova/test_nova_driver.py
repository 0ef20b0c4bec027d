"""The `nova` migration driver against a real Nova (API, conductor, scheduler,
placement and three nova-compute services with the per-server fake driver).

Fault cases go through lab/faultproxy.py between the driver and Nova.
"""

import statistics
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from hostmaint.coordinator.drivers import (
    Conflict,
    Forbidden,
    InstanceState,
    InvalidRequest,
    MigrationDriver,
    MigrationKind,
    MigrationRef,
    MigrationState,
    MigrationStatus,
    NotFound,
)
from hostmaint.coordinator.drivers.nova import NovaDriver, NovaUnavailable, connect
from hostmaint.lab.faultproxy import Fault, FaultProxy

from .conftest import ADMIN_HEADERS, NovaAdmin, NovaProcess

HOLD = {"hostmaint:migration_s": "hold"}
ACTION = r"^/v2\.1/servers/[^/]+/action$"


def make_driver(url: str, **kwargs: object) -> NovaDriver:
    timeout_s = float(kwargs.pop("timeout_s", 10.0))  # type: ignore[arg-type]
    conn = connect(endpoint=url, headers=ADMIN_HEADERS, timeout_s=timeout_s)
    options: dict[str, object] = {"lookup_timeout_s": 20.0, "poll_interval_s": 0.05}
    options.update(kwargs)
    return NovaDriver(conn, timeout_s=timeout_s, **options)  # type: ignore[arg-type]


@pytest.fixture
def driver(nova: NovaProcess) -> NovaDriver:
    return make_driver(nova.url)


@pytest.fixture
def servers(nova_admin: NovaAdmin) -> Iterator[list[str]]:
    """Server ids a test creates; deleted at its end."""
    created: list[str] = []
    yield created
    for server_id in created:
        nova_admin.delete_server(server_id)


def wait_for(
    driver: MigrationDriver,
    ref: MigrationRef,
    done: Callable[[MigrationStatus], bool],
    timeout_s: float = 30.0,
) -> tuple[MigrationStatus, list[MigrationStatus]]:
    """Polls the migration until `done`; returns the last status and all seen."""
    seen: list[MigrationStatus] = []
    deadline = time.monotonic() + timeout_s
    while True:
        status = driver.get_migration(ref)
        seen.append(status)
        if done(status):
            return status, seen
        if time.monotonic() > deadline:
            raise AssertionError(f"migration {ref} still {status.cloud_status}")
        time.sleep(0.05)


def finished(status: MigrationStatus) -> bool:
    return status.state.finished


def running(status: MigrationStatus) -> bool:
    return status.state is MigrationState.RUNNING


def test_disable_host_records_reason_and_enable_restores(
    driver: NovaDriver, nova_admin: NovaAdmin
) -> None:
    reason = f"hostmaint drain {uuid.uuid4().hex[:6]}"
    driver.disable_host("host1", reason)
    try:
        assert driver.host_enabled("host1") is False
        services = nova_admin.http.get(
            f"{nova_admin.nova.url}/os-services", params={"host": "host1"}
        ).json()["services"]
        assert [(s["status"], s["disabled_reason"]) for s in services] == [("disabled", reason)]
        hosts = {h.name: h for h in driver.list_hosts()}
        assert hosts["host1"].enabled is False
        assert hosts["host1"].disabled_reason == reason
        assert hosts["host1"].up is True
        assert hosts["host2"].enabled is True
        assert hosts["host2"].free_memory_mb is not None and hosts["host2"].free_memory_mb > 0
    finally:
        driver.enable_host("host1")
    assert driver.host_enabled("host1") is True
    assert {h.name for h in driver.list_hosts()} >= {"host1", "host2", "host3"}


def test_drain_host1(driver: NovaDriver, nova_admin: NovaAdmin, servers: list[str]) -> None:
    """The whole drain: disable, list across projects, move each VM, enable."""
    vms = [
        nova_admin.create_server("host1", project="tenant-a"),
        nova_admin.create_server("host1", project="tenant-b", flavor="2"),
        nova_admin.create_server("host1", project="tenant-b"),
    ]
    servers.extend(vms)
    driver.disable_host("host1", "maintenance: firmware")
    try:
        on_host = {i.uuid: i for i in driver.list_instances("host1")}
        assert set(vms) <= set(on_host)
        assert {on_host[v].project_id for v in vms} == {"tenant-a", "tenant-b"}
        targets = [None, "host2", None]
        refs = [
            driver.start_live_migration(vm, target_host=target)
            for vm, target in zip(vms, targets, strict=True)
        ]
        finals = [wait_for(driver, ref, finished)[0] for ref in refs]
        assert [f.state for f in finals] == [MigrationState.COMPLETED] * 3
        assert finals[1].dest_host == "host2"
        assert all(f.dest_host in {"host2", "host3"} for f in finals)
        assert not set(vms) & {i.uuid for i in driver.list_instances("host1")}
    finally:
        driver.enable_host("host1")
    assert driver.host_enabled("host1")


def test_unknown_host_is_not_found(driver: NovaDriver) -> None:
    with pytest.raises(NotFound):
        driver.host_enabled("no-such-host")


def test_list_instances_across_projects(
    driver: NovaDriver, nova_admin: NovaAdmin, servers: list[str]
) -> None:
    group = nova_admin.create_server_group("anti-affinity", project="project-b")
    a = nova_admin.create_server("host1", project="project-a", flavor="1")
    servers.append(a)
    b = nova_admin.create_server("host1", project="project-b", flavor="2")
    servers.append(b)
    nova_admin.http.post(
        f"{nova_admin.nova.url}/servers/{b}/action", json={"pause": None}
    ).raise_for_status()
    nova_admin.wait_server(b, {"PAUSED"})
    elsewhere = nova_admin.create_server("host2", project="project-a")
    servers.append(elsewhere)
    # A group member created through the API (Nova records membership at boot).
    c = _create_in_group(nova_admin, group, "host1", "project-b")
    servers.append(c)

    found = {i.uuid: i for i in driver.list_instances("host1")}

    assert {a, b, c} <= set(found)
    assert elsewhere not in found
    assert (found[a].project_id, found[b].project_id) == ("project-a", "project-b")
    assert (found[a].flavor_name, found[a].vcpus, found[a].memory_mb) == ("m1.tiny", 1, 512)
    assert (found[b].flavor_name, found[b].memory_mb) == ("m1.small", 2048)
    assert found[a].state is InstanceState.ACTIVE
    assert found[b].state is InstanceState.PAUSED
    assert [(g.id, g.policy) for g in found[c].server_groups] == [(group, "anti-affinity")]
    assert found[a].server_groups == ()
    assert all(i.host == "host1" for i in found.values())


def _create_in_group(nova_admin: NovaAdmin, group: str, host: str, project: str) -> str:
    body = {
        "server": {
            "name": "grouped",
            "imageRef": nova_admin.nova.image_id,
            "flavorRef": "1",
            "networks": "none",
            "availability_zone": f"nova:{host}",
        },
        "os:scheduler_hints": {"group": group},
    }
    resp = nova_admin.http.post(
        f"{nova_admin.nova.url}/servers", json=body, headers={"X-Auth-Project-Id": project}
    )
    resp.raise_for_status()
    server_id: str = resp.json()["server"]["id"]
    nova_admin.wait_server(server_id, {"ACTIVE"})
    return server_id


def test_live_migration_without_target_lets_scheduler_choose(
    driver: NovaDriver, nova_admin: NovaAdmin, servers: list[str]
) -> None:
    server = nova_admin.create_server("host1")
    servers.append(server)
    driver.disable_host("host1", "drain")
    try:
        ref = driver.start_live_migration(server)
        assert ref.kind is MigrationKind.LIVE and ref.instance_uuid == server
        final, seen = wait_for(driver, ref, finished)
    finally:
        driver.enable_host("host1")
    assert final.state is MigrationState.COMPLETED
    assert final.source_host == "host1"
    assert final.dest_host in {"host2", "host3"}
    assert nova_admin.wait_server(server, {"ACTIVE"})["OS-EXT-SRV-ATTR:host"] == final.dest_host
    assert driver.latest_migration(server) == ref
    assert {s.cloud_status for s in seen} <= {
        "accepted", "queued", "preparing", "running", "post-migrating", "completed"
    }  # fmt: skip


def test_live_migration_to_target_with_progress(
    driver: NovaDriver, nova_admin: NovaAdmin, servers: list[str]
) -> None:
    server = nova_admin.create_server("host1", metadata={"hostmaint:migration_s": "2"})
    servers.append(server)
    ref = driver.start_live_migration(server, target_host="host3", block_migration=None)
    final, seen = wait_for(driver, ref, finished)
    assert final.state is MigrationState.COMPLETED
    assert (final.source_host, final.dest_host) == ("host1", "host3")
    with_progress = [s for s in seen if s.memory_total_bytes]
    assert with_progress, "a running live migration reports its memory counters"
    assert all(s.memory_total_bytes == 512 * 2**20 for s in with_progress)
    remaining = [s.memory_remaining_bytes for s in with_progress]
    assert remaining == sorted(remaining, key=lambda r: -(r or 0))
    assert nova_admin.server(server)["OS-EXT-SRV-ATTR:host"] == "host3"


def test_live_migration_at_microversion_2_30_sends_force_false(
    nova: NovaProcess, nova_admin: NovaAdmin, servers: list[str]
) -> None:
    driver = make_driver(nova.url, microversion="2.30")
    assert driver.microversion() == "2.30"
    server = nova_admin.create_server("host2")
    servers.append(server)
    # /os-migrations?instance_uuid= only filters from 2.59: the driver
    # filters the records itself.
    ref = driver.start_live_migration(server, target_host="host3")
    final, _ = wait_for(driver, ref, finished)
    assert (final.state, final.dest_host) == (MigrationState.COMPLETED, "host3")


def test_force_complete_and_abort_act_per_server(
    driver: NovaDriver, nova_admin: NovaAdmin, servers: list[str]
) -> None:
    a = nova_admin.create_server("host1", metadata=HOLD)
    servers.append(a)
    b = nova_admin.create_server("host2", metadata=HOLD)
    servers.append(b)
    ref_a = driver.start_live_migration(a, target_host="host3")
    ref_b = driver.start_live_migration(b, target_host="host3")
    try:
        wait_for(driver, ref_a, running)
        # Nova marks the migration running before the compute reports its first progress
        held, _ = wait_for(driver, ref_b, lambda s: running(s) and s.memory_total_bytes is not None)
        assert held.memory_total_bytes == 512 * 2**20
        with pytest.raises(Conflict) as busy:
            driver.start_live_migration(a, target_host="host2")
        assert "migrating" in busy.value.message

        driver.force_complete(ref_a)
        done_a, _ = wait_for(driver, ref_a, finished)
        assert done_a.state is MigrationState.COMPLETED
        assert driver.get_migration(ref_b).state is MigrationState.RUNNING

        driver.abort(ref_b)
        done_b, _ = wait_for(driver, ref_b, finished)
        assert done_b.state is MigrationState.CANCELLED
        assert nova_admin.wait_server(b, {"ACTIVE"})["OS-EXT-SRV-ATTR:host"] == "host2"
        assert nova_admin.wait_server(a, {"ACTIVE"})["OS-EXT-SRV-ATTR:host"] == "host3"
    finally:
        for ref in (ref_a, ref_b):
            if not driver.get_migration(ref).state.finished:
                driver.abort(ref)

    with pytest.raises(Conflict) as second_abort:
        driver.abort(ref_b)
    assert second_abort.value.status == 409 and second_abort.value.message
    with pytest.raises(Conflict) as late_force:
        driver.force_complete(ref_a)
    assert "force_complete" in late_force.value.message


def test_unknown_target_host_is_an_invalid_request(
    driver: NovaDriver, nova_admin: NovaAdmin, servers: list[str]
) -> None:
    server = nova_admin.create_server("host1")
    servers.append(server)
    with pytest.raises(InvalidRequest) as err:
        driver.start_live_migration(server, target_host="no-such-host")
    assert err.value.status == 400 and "no-such-host" in err.value.message
    assert driver.latest_migration(server) is None


def test_unknown_server_is_not_found(driver: NovaDriver) -> None:
    missing = str(uuid.uuid4())
    with pytest.raises(NotFound):
        driver.start_live_migration(missing)
    assert driver.latest_migration(missing) is None
    with pytest.raises(NotFound):
        driver.get_migration(MigrationRef(missing, 10**6, MigrationKind.LIVE))


def test_failed_live_migration_reports_error(
    driver: NovaDriver, nova_admin: NovaAdmin, servers: list[str]
) -> None:
    server = nova_admin.create_server("host1", metadata={"hostmaint:migration_fail_s": "0.3"})
    servers.append(server)
    ref = driver.start_live_migration(server, target_host="host2")
    final, _ = wait_for(driver, ref, finished)
    assert (final.state, final.cloud_status) == (MigrationState.FAILED, "failed")
    assert nova_admin.wait_server(server, {"ACTIVE"})["OS-EXT-SRV-ATTR:host"] == "host1"


def test_target_refused_after_acceptance_ends_in_error(
    driver: NovaDriver, nova_admin: NovaAdmin, servers: list[str]
) -> None:
    """A target refused after the 202 (its own host) leaves the record in error."""
    server = nova_admin.create_server("host1")
    servers.append(server)
    ref = driver.start_live_migration(server, target_host="host1")
    final, _ = wait_for(driver, ref, finished)
    assert (final.state, final.cloud_status) == (MigrationState.ERROR, "error")
    assert nova_admin.wait_server(server, {"ACTIVE"})["OS-EXT-SRV-ATTR:host"] == "host1"


def test_cold_migration_waits_for_confirm(
    driver: NovaDriver, nova_admin: NovaAdmin, servers: list[str]
) -> None:
    server = nova_admin.create_server("host1")
    servers.append(server)
    ref = driver.cold_migrate(server, target_host="host2")
    assert ref.kind is MigrationKind.COLD
    moved, _ = wait_for(
        driver, ref, lambda s: s.state is MigrationState.AWAITING_CONFIRM or s.state.finished
    )
    assert moved.state is MigrationState.AWAITING_CONFIRM
    nova_admin.wait_server(server, {"VERIFY_RESIZE"})
    driver.confirm_migration(ref)
    final, _ = wait_for(driver, ref, finished)
    assert (final.state, final.cloud_status) == (MigrationState.COMPLETED, "confirmed")
    assert nova_admin.wait_server(server, {"ACTIVE"})["OS-EXT-SRV-ATTR:host"] == "host2"


def test_microversion_floor_above_server_is_refused(nova: NovaProcess) -> None:
    driver = make_driver(nova.url, microversion="2.999", min_microversion="2.500")
    with pytest.raises(InvalidRequest):
        driver.host_enabled("host1")


# -- faults injected between the driver and Nova ---------------------------


def test_get_retried_after_500s_then_succeeds(nova: NovaProcess, fault_proxy: FaultProxy) -> None:
    driver = make_driver(fault_proxy.url + "/v2.1", get_retries=3, backoff_s=0.01)
    fault_proxy.add(Fault(method="GET", path=r"/os-services\?", status=500, times=2))
    assert driver.host_enabled("host1") is True
    answers = [s.status for s in fault_proxy.seen("GET", r"/os-services\?")]
    assert answers == [500, 500, 200]


def test_get_gives_up_after_bounded_retries(nova: NovaProcess, fault_proxy: FaultProxy) -> None:
    driver = make_driver(fault_proxy.url + "/v2.1", get_retries=2, backoff_s=0.01)
    fault_proxy.add(Fault(method="GET", path=r"/os-services\?", status=503, times=None))
    with pytest.raises(NovaUnavailable) as err:
        driver.host_enabled("host1")
    assert (err.value.status, err.value.attempts) == (503, 3)
    assert err.value.may_have_acted is False
    assert len(fault_proxy.seen("GET", r"/os-services\?")) == 3


def test_4xx_is_never_retried(nova: NovaProcess, fault_proxy: FaultProxy) -> None:
    driver = make_driver(fault_proxy.url + "/v2.1", get_retries=3, backoff_s=0.01)
    fault_proxy.add(Fault(method="POST", path=ACTION, status=409, times=None))
    fault_proxy.add(Fault(method="GET", path=r"/os-hypervisors", status=403, times=None))
    with pytest.raises(Conflict):
        driver.start_live_migration(str(uuid.uuid4()))
    with pytest.raises(Forbidden):
        driver.list_hosts()
    assert len(fault_proxy.seen("POST", ACTION)) == 1
    assert len(fault_proxy.seen("GET", r"/os-hypervisors")) == 1


def test_500_on_migrate_action_is_not_repeated(
    nova: NovaProcess, nova_admin: NovaAdmin, fault_proxy: FaultProxy, servers: list[str]
) -> None:
    """Nova started the migration but its answer was lost: no second POST."""
    server = nova_admin.create_server("host1")
    servers.append(server)
    driver = make_driver(fault_proxy.url + "/v2.1", get_retries=3, backoff_s=0.01)
    fault_proxy.add(Fault(method="POST", path=ACTION, status=500, forward=True))
    with pytest.raises(NovaUnavailable) as err:
        driver.start_live_migration(server, target_host="host2")
    assert err.value.may_have_acted is True and err.value.status == 500
    assert len(fault_proxy.seen("POST", ACTION)) == 1
    # The caller re-checks state instead of repeating the action.
    ref = driver.latest_migration(server)
    assert ref is not None
    final, _ = wait_for(driver, ref, finished)
    assert final.state is MigrationState.COMPLETED
    assert len(nova_admin.migrations(server)) == 1


def test_lost_lookup_after_accepted_action_says_it_may_have_acted(
    nova: NovaProcess, nova_admin: NovaAdmin, fault_proxy: FaultProxy, servers: list[str]
) -> None:
    server = nova_admin.create_server("host1")
    servers.append(server)
    driver = make_driver(fault_proxy.url + "/v2.1", get_retries=1, backoff_s=0.01)
    # The first lookup (before the action) passes; those after it fail.
    fault_proxy.add(Fault(method="GET", path=r"/os-migrations\?", status=500, skip=1, times=None))
    with pytest.raises(NovaUnavailable) as err:
        driver.start_live_migration(server)
    assert err.value.may_have_acted is True
    assert [s.status for s in fault_proxy.seen("POST", ACTION)] == [202]
    fault_proxy.clear()
    ref = driver.latest_migration(server)
    assert ref is not None
    assert wait_for(driver, ref, finished)[0].state is MigrationState.COMPLETED


def test_500_before_nova_leaves_no_migration(
    nova: NovaProcess, nova_admin: NovaAdmin, fault_proxy: FaultProxy, servers: list[str]
) -> None:
    server = nova_admin.create_server("host1")
    servers.append(server)
    driver = make_driver(fault_proxy.url + "/v2.1")
    fault_proxy.add(Fault(method="POST", path=ACTION, status=502))
    with pytest.raises(NovaUnavailable) as err:
        driver.start_live_migration(server)
    assert err.value.may_have_acted is True
    assert driver.latest_migration(server) is None
    assert len(fault_proxy.seen("POST", ACTION)) == 1


def test_timeout_surfaces_unavailable_within_deadline(
    nova: NovaProcess, fault_proxy: FaultProxy
) -> None:
    delay_s = 20.0
    driver = make_driver(
        fault_proxy.url + "/v2.1", timeout_s=0.5, get_retries=5, backoff_s=0.1, deadline_s=1.5
    )
    fault_proxy.add(Fault(method="GET", path=r"/os-services\?", delay_s=delay_s, times=None))
    with pytest.raises(NovaUnavailable) as err:
        driver.host_enabled("host1")
    assert err.value.status is None
    assert err.value.elapsed_s < delay_s  # it did not wait for the held answer
    assert 1 <= err.value.attempts < 6


# -- figures ----------------------------------------------------------------


def test_call_latency_figures(
    nova: NovaProcess, driver: NovaDriver, nova_admin: NovaAdmin, servers: list[str]
) -> None:
    """Prints per-call latency against the real Nova (no assertion on time)."""
    server = nova_admin.create_server("host2")
    servers.append(server)
    samples: dict[str, list[float]] = {}

    def timed(name: str, call: Callable[[], object]) -> object:
        started = time.perf_counter()
        result = call()
        samples.setdefault(name, []).append((time.perf_counter() - started) * 1000)
        return result

    for _ in range(10):
        assert timed("host_enabled", lambda: driver.host_enabled("host2")) is True
        assert server in {
            i.uuid
            for i in timed("list_instances", lambda: driver.list_instances("host2"))  # type: ignore[attr-defined]
        }
        assert len(timed("list_hosts", driver.list_hosts)) == 3  # type: ignore[arg-type]
    ref = timed("start_live_migration", lambda: driver.start_live_migration(server, "host3"))
    assert isinstance(ref, MigrationRef)
    final, _ = wait_for(driver, ref, finished)
    for _ in range(10):
        status = timed("get_migration(finished)", lambda: driver.get_migration(ref))
        assert status == final  # type: ignore[comparison-overlap]
    print(f"\nnova: startup_s={nova.startup_s:.2f} rss_mib={nova.rss_bytes / 2**20:.0f}")
    for name, values in samples.items():
        print(
            f"nova call {name}: n={len(values)} median_ms={statistics.median(values):.1f} "
            f"max_ms={max(values):.1f}"
        )
