"""Rolls through the gRPC API and the `hostmaint` CLI, on a simulated cloud."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from hostmaint.common import daemon
from hostmaint.coordinator import cli
from hostmaint.coordinator.cmd import SERVICE_NAME
from hostmaint.coordinator.servicer import CoordinatorServicer
from hostmaint.protos import coordinator_pb2 as cpb
from hostmaint.protos import coordinator_pb2_grpc
from tests.coordinator.rollworld import HOSTS, RollWorld, build


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[RollWorld, str]]:
    world = build(tmp_path)
    executor, rolls = world.coordinator()
    servicer = CoordinatorServicer(executor, world.agents, rolls)  # type: ignore[arg-type]
    server = daemon.build_server(
        "127.0.0.1:0",
        lambda s: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, s),
        [SERVICE_NAME],
        tls=daemon.TlsFiles("", "", ""),
        insecure=False,
    )
    server.server.start()
    server.set_serving(True)
    try:
        yield world, f"127.0.0.1:{server.port}"
    finally:
        world.stop()
        server.stop(0.5)


def run(address: str, *argv: str) -> int:
    return cli.main(["--coordinator", address, "--timeout", "10", *argv])


def test_dry_run_prints_the_waves_and_moves_nothing(
    served: tuple[RollWorld, str], capsys: pytest.CaptureFixture[str]
) -> None:
    world, address = served
    assert run(address, "roll", *HOSTS, "--max-hosts-per-wave", "2", "--dry-run") == 0
    out = capsys.readouterr().out
    assert out.startswith("roll of 4 hosts in ")
    assert "6 VMs" in out and "wave 1: " in out and "TARGET" in out
    assert run(address, "roll", "--aggregate", "rack1", "--dry-run", "--json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert sorted(h["host"] for w in plan["waves"] for h in w["hosts"]) == list(HOSTS)
    assert plan["vm_count"] == 6
    assert world.driver.moves() == []


def test_a_roll_with_a_hook_through_the_cli(
    served: tuple[RollWorld, str], capsys: pytest.CaptureFixture[str]
) -> None:
    world, address = served
    world.fail_hook_on("h3")
    code = run(address, "roll", "h3", "h4", "--hook", "patch", "--progress", "lines")
    assert code == cli.EXIT_INCOMPLETE  # stopped: h3's hook failed
    out = capsys.readouterr().out
    assert "hook started" in out and "host failed" in out
    assert "the hook exited 3: patch of h3 failed" in out
    assert "resume with: hostmaint roll-resume" in out

    assert run(address, "roll-status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "ROLL_STATE_STOPPED"

    assert run(address, "roll-resume", "--skip", "h3", "--json") == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[-1]["kind"] == "ROLL_EVENT_KIND_FINISHED"
    assert events[-1]["status"]["state"] == "ROLL_STATE_COMPLETED"
    assert world.hook_runs() == Counter({"h3": 1, "h4": 1})
    assert not world.driver.host_enabled("h3") and world.driver.host_enabled("h4")


def test_errors_map_to_codes(served: tuple[RollWorld, str]) -> None:
    _, address = served
    with grpc.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        for request, code in [
            (cpb.RollRequest(hosts=["nope"]), grpc.StatusCode.NOT_FOUND),
            (cpb.RollRequest(hosts=["h1"], hook="/bin/sh"), grpc.StatusCode.INVALID_ARGUMENT),
            (cpb.RollRequest(hosts=["h1"], hook="absent"), grpc.StatusCode.FAILED_PRECONDITION),
            (cpb.RollRequest(hosts=["bad host"]), grpc.StatusCode.INVALID_ARGUMENT),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Roll(request, timeout=10))
            assert err.value.code() == code, request
        for call in (
            lambda: stub.GetRoll(cpb.GetRollRequest(), timeout=10),
            lambda: stub.GetRoll(
                cpb.GetRollRequest(roll_id="00000000-0000-4000-8000-000000000000"), timeout=10
            ),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert run(address, "roll", "h1", "--aggregate", "rack1") == cli.EXIT_USAGE
