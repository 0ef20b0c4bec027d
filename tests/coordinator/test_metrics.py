"""The coordinator's Prometheus endpoint, scraped over HTTP from running coordinators.

One runs as `hostmaint-coordinator` builds it, with the libvirt driver over
test:/// agents (whose hosts refuse to migrate); one around the simulated
cloud, whose migrations complete.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from hostmaint.protos import coordinator_pb2 as cpb
from hostmaint.protos import coordinator_pb2_grpc
from tests.coordinator.conftest import Cluster, running_cluster
from tests.coordinator.loadcluster import (
    Layout,
    SimCoordinator,
    drain_policy,
    follow_drain,
    simulated,
)
from tests.scrape import Series, labelled, scrape, value

WAIT_S = 30.0


@pytest.fixture
def measured(tmp_path: Path) -> Iterator[Cluster]:
    """The libvirt-driver cluster of test:/// hosts, its coordinator serving metrics."""
    with running_cluster(tmp_path, metrics_listen="127.0.0.1:0") as cluster:
        yield cluster


def scrape_until(port: int, name: str, want: float, **labels: str) -> Series:
    """Scrapes until `name{labels}` reads `want` (the follower catches up within its interval)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        series = scrape(port)
        if value(series, name, **labels) == want or time.monotonic() > deadline:
            return series
        time.sleep(0.05)


def test_a_drain_whose_migrations_fail_is_counted_with_the_agents_refusals(
    measured: Cluster,
) -> None:
    metrics = measured.coordinator.metrics
    assert metrics is not None and metrics.endpoint is not None
    port = metrics.endpoint.port
    events = list(measured.stub.Drain(cpb.DrainRequest(host="host1"), timeout=WAIT_S))
    final = events[-1].status
    assert final.state == cpb.DRAIN_STATE_INCOMPLETE

    series = scrape_until(port, "hostmaint_drains_finished_total", 1.0, state="incomplete")
    assert value(series, "hostmaint_drains_finished_total", state="incomplete") == 1.0
    assert value(series, "hostmaint_drains_finished_total", state="completed") == 0.0
    # test:/// hosts refuse to migrate: two live-migratable VMs fail, four cannot move
    assert value(series, "hostmaint_migrations_total", outcome="failed") == 2.0
    assert value(series, "hostmaint_migrations_total", outcome="unmovable") == 4.0
    assert value(series, "hostmaint_migrations_total", outcome="completed") == 0.0
    assert value(series, "hostmaint_drain_planning_seconds_count") == 1.0
    predicted = value(series, "hostmaint_drain_makespan_seconds_sum", estimate="predicted")
    assert predicted == pytest.approx(final.summary.predicted_makespan_s)
    actual = value(series, "hostmaint_drain_makespan_seconds_sum", estimate="actual")
    assert actual == pytest.approx(final.summary.actual_makespan_s)
    # the refusals, by agent, operation and code
    migrate_refused = value(
        series,
        "hostmaint_agent_call_errors_total",
        host="host1",
        operation="Migrate",
        code="INVALID_ARGUMENT",
    )
    assert migrate_refused is not None and migrate_refused >= 2.0
    assert value(series, "hostmaint_agent_up", host="host1") == 1.0
    assert value(series, "hostmaint_coordinator_leader") == 1.0
    assert value(series, "hostmaint_coordinator_rpcs_total", method="Drain", code="OK") == 1.0
    # nothing of the finished drain stays as a series of its own
    assert labelled(series, "hostmaint_drain_started_timestamp_seconds") == []
    assert labelled(series, "hostmaint_migration_phase") == []


def test_an_unknown_host_is_counted_as_the_error_it_got(measured: Cluster) -> None:
    metrics = measured.coordinator.metrics
    assert metrics is not None and metrics.endpoint is not None
    with pytest.raises(grpc.RpcError):
        measured.stub.PlanDrain(cpb.PlanDrainRequest(host="nowhere"), timeout=WAIT_S)
    series = scrape(metrics.endpoint.port)
    assert (
        value(series, "hostmaint_coordinator_rpcs_total", method="PlanDrain", code="NOT_FOUND")
        == 1.0
    )


@pytest.fixture
def layout() -> Layout:
    return Layout.build(1, 4, 2)


@pytest.fixture
def simulated_cloud(tmp_path: Path, layout: Layout) -> Iterator[SimCoordinator]:
    # Migrations of a few seconds each: a running one must outlast the follower's start
    # and a scrape on a busy machine, or the test sees none.
    with simulated(
        tmp_path, layout, time_scale=1.0, poll_interval_s=0.05, metrics_listen="127.0.0.1:0"
    ) as coordinator:
        yield coordinator


def test_running_migrations_show_while_they_run_and_completed_ones_are_counted(
    simulated_cloud: SimCoordinator, layout: Layout
) -> None:
    metrics = simulated_cloud.metrics
    assert metrics is not None and metrics.endpoint is not None
    port = metrics.endpoint.port
    stub = coordinator_pb2_grpc.CoordinatorStub(
        grpc.insecure_channel(f"127.0.0.1:{simulated_cloud.port}")
    )
    seen: list[Series] = []
    stop = threading.Event()

    def watch() -> None:  # as Prometheus would, every 50 ms
        while not stop.is_set():
            series = scrape(port)
            if labelled(series, "hostmaint_migration_phase"):
                seen.append(series)
            stop.wait(0.05)

    watcher = threading.Thread(target=watch, name="scraper", daemon=True)
    watcher.start()
    try:
        result = follow_drain(stub, "src000", drain_policy(layout.targets), timeout_s=120)
    finally:
        stop.set()
        watcher.join(10)
    assert result.final is not None and result.final.state == cpb.DRAIN_STATE_COMPLETED

    assert seen, "no running migration was ever scraped"
    running = labelled(seen[0], "hostmaint_migration_phase")
    assert {r["host"] for r in running} == {"src000"}
    assert {r["phase"] for r in running} <= {
        "setup",
        "precopy",
        "postcopy",
        "postcopy_paused",
        "completed",
        "failed",
        "cancelled",
    }
    assert any(labelled(s, "hostmaint_drain_started_timestamp_seconds") for s in seen)
    assert any(value(s, "hostmaint_drain_planned_makespan_seconds", host="src000") for s in seen)

    series = scrape_until(port, "hostmaint_migrations_total", 4.0, outcome="completed")
    assert value(series, "hostmaint_migrations_total", outcome="completed") == 4.0
    assert value(series, "hostmaint_drains_finished_total", state="completed") == 1.0
    assert labelled(series, "hostmaint_migration_phase") == []
    assert labelled(series, "hostmaint_drain_started_timestamp_seconds") == []
