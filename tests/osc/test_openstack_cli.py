"""`openstack maintenance ...`: the real `openstack` command against a running coordinator.

The coordinator drains a simulated cloud (tests/coordinator/loadcluster.py:
agents on test:/// hosts, a real coordinator around a simulated driver); the
OpenStack client runs as a subprocess from the virtualenv, with the plugin
installed through its entry points (the `osc` extra), and its `-f json`
output is parsed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.coordinator.loadcluster import Layout, simulated
from tests.osc.conftest import OpenStack
from tests.ports import free_port

pytestmark = pytest.mark.osc

VMS = 3


@dataclass(frozen=True)
class Cloud(OpenStack):
    layout: Layout


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    """One coordinator over a source of VMS VMs and two empty targets, for the module."""
    workdir = tmp_path_factory.mktemp("osc")
    layout = Layout.build(1, VMS, 2)
    with simulated(
        workdir, layout, time_scale=0.2, poll_interval_s=0.05, max_parallel_per_source=2
    ) as coordinator:
        home = workdir / "home"
        home.mkdir()
        yield Cloud(f"127.0.0.1:{coordinator.port}", home, layout)


def source_uuids(cloud: Cloud) -> set[str]:
    return {d.uuid for d in cloud.layout.sources["src000"]}


def test_the_plugin_registers_its_commands(cloud: Cloud) -> None:
    out = cloud.run("command", "list", "--group", "openstack.maintenance.v1", "-f", "json")
    assert out.returncode == 0, out.stderr
    (group,) = json.loads(out.stdout)
    assert set(group["Commands"]) == {
        "maintenance plan",
        "maintenance drain",
        "maintenance status",
        "maintenance cancel",
        "maintenance undrain",
        "maintenance agent list",
    }


def test_agent_list(cloud: Cloud) -> None:
    rows = cloud.json("maintenance", "agent", "list", "--long")
    hosts = {*cloud.layout.sources, *cloud.layout.targets}
    assert {r["Host"] for r in rows} == hosts
    assert {r["Health"] for r in rows} == {"SERVING"}
    assert all(r["Address"].startswith("127.0.0.1:") for r in rows)
    by_host = {r["Host"]: r for r in rows}
    assert by_host["src000"]["Domains"] == VMS
    assert by_host["dst000"]["Domains"] == 0


def test_plan_has_a_row_per_vm(cloud: Cloud) -> None:
    rows = cloud.json("maintenance", "plan", "src000", "--target", "dst000", "--target", "dst001")
    assert {r["VM"] for r in rows} == source_uuids(cloud)
    assert {r["Action"] for r in rows} == {"live"}
    assert {r["Target"] for r in rows} <= {"dst000", "dst001"}
    assert sorted(r["Position"] for r in rows) == list(range(len(rows)))
    assert all(r["Predicted (s)"] > 0 and r["Downtime (ms)"] > 0 for r in rows)


def test_the_endpoint_from_clouds_yaml(cloud: Cloud, tmp_path: Path) -> None:
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text(
        "clouds:\n"
        "  lab:\n"
        "    auth: {auth_url: 'http://127.0.0.1:1/identity'}\n"
        f"    maintenance_endpoint: '{cloud.address}'\n"
    )
    env = {"OS_CLIENT_CONFIG_FILE": str(clouds), "HOSTMAINT_COORDINATOR": ""}
    rows = cloud.json("--os-cloud", "lab", "maintenance", "agent", "list", env=env)
    assert len(rows) == 3
    # The option beats clouds.yaml.
    out = cloud.run(
        "--os-cloud",
        "lab",
        "--os-maintenance-endpoint",
        f"127.0.0.1:{free_port()}",
        "maintenance",
        "agent",
        "list",
        env=env,
    )
    assert out.returncode == 5 and "UNAVAILABLE" in out.stderr


def test_an_unknown_host_is_not_found(cloud: Cloud) -> None:
    out = cloud.run("maintenance", "status", "nosuchhost", "-f", "json")
    assert out.returncode == 3, out.stderr
    assert out.stderr.startswith("openstack maintenance status: NOT_FOUND: "), out.stderr
    assert out.stdout == ""
    out = cloud.run("maintenance", "plan", "nosuchhost", "-f", "json")
    assert out.returncode == 3 and "NOT_FOUND" in out.stderr, out.stderr


def test_an_unreachable_coordinator(cloud: Cloud) -> None:
    out = cloud.run(
        "maintenance", "agent", "list", env={"HOSTMAINT_COORDINATOR": f"127.0.0.1:{free_port()}"}
    )
    assert out.returncode == 5, out.stderr
    assert out.stderr.startswith("openstack maintenance agent list: UNAVAILABLE: "), out.stderr


def test_bad_arguments_send_nothing(cloud: Cloud, tmp_path: Path) -> None:
    out = cloud.run("maintenance", "plan", "src000", "--max-downtime-ms", "0")
    assert out.returncode == 2
    assert "--max-downtime-ms must be between 1 and" in out.stderr
    out = cloud.run("maintenance", "agent", "list", env={"HOSTMAINT_COORDINATOR": "nowhere"})
    assert out.returncode == 2
    assert "--os-maintenance-endpoint must be HOST:PORT" in out.stderr
    cert = tmp_path / "client.pem"
    cert.write_text("")
    out = cloud.run("--os-maintenance-cert", str(cert), "maintenance", "agent", "list")
    assert out.returncode == 2
    assert "TLS needs all of --os-maintenance-cert" in out.stderr


def test_drain_status_and_undrain(cloud: Cloud) -> None:
    """Last in the module: it empties src000."""
    drained = cloud.json(
        "maintenance", "drain", "src000", "--target", "dst000", "--target", "dst001"
    )
    assert drained["state"] == "completed"
    assert drained["host"] == "src000"
    assert drained["migrated"] == VMS and drained["failed"] == 0
    assert {vm["vm_uuid"] for vm in drained["vms"]} == source_uuids(cloud)
    assert {vm["state"] for vm in drained["vms"]} == {"completed"}
    assert {vm["target_host"] for vm in drained["vms"]} <= {"dst000", "dst001"}

    status = cloud.json("maintenance", "status", "src000")
    assert status["drain_id"] == drained["drain_id"]
    assert status["state"] == "completed"
    assert status["finished_at"]
    by_id = cloud.run("maintenance", "status", "--drain-id", drained["drain_id"], "-f", "value")
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.stdout.startswith(drained["drain_id"])

    undrained = cloud.json("maintenance", "undrain", "src000")
    assert undrained == {"host": "src000", "enabled": True}
