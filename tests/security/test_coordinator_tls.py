"""The coordinator with mutual TLS on both sides: the CLI to it, it to the agents."""

from __future__ import annotations

import grpc
import pytest

from hostmaint.common import daemon
from hostmaint.common.pki import CertFiles
from hostmaint.coordinator import cli
from hostmaint.protos import coordinator_pb2 as cpb
from hostmaint.protos import coordinator_pb2_grpc
from tests.agent.conftest import WEB
from tests.tlscluster import Pki, TlsCluster, tls_of

T = 30
LONG = "h" * 5000


def _cli(cluster: TlsCluster, client: CertFiles | None, *args: str) -> int:
    base = ["--coordinator", f"127.0.0.1:{cluster.coordinator.port}", "--timeout", "10"]
    if client is not None:
        base += ["--cert", str(client.cert_file), "--key", str(client.key_file)]
        base += ["--ca", str(client.ca_file)]
    return cli.main([*base, *args])


def test_cli_with_a_certificate_sees_agents_reached_over_tls(
    tls_cluster: TlsCluster, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli(tls_cluster, pki.operator, "agents") == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "host1" in out and "host2" in out
    with daemon.channel(
        f"127.0.0.1:{tls_cluster.coordinator.port}", tls_of(pki.operator)
    ) as channel:
        agents = coordinator_pb2_grpc.CoordinatorStub(channel).ListAgents(
            cpb.ListAgentsRequest(), timeout=T
        )
    by_host = {a.host: a for a in agents.agents}
    assert {h: a.health for h, a in by_host.items()} == {"host1": "SERVING", "host2": "SERVING"}
    assert by_host["host1"].last_report.domain_count == 6


@pytest.mark.parametrize("who", ["none", "foreign", "expired"])
def test_cli_without_a_valid_certificate_is_refused(
    tls_cluster: TlsCluster, pki: Pki, who: str, capsys: pytest.CaptureFixture[str]
) -> None:
    client = {"none": None, "foreign": pki.foreign, "expired": pki.expired}[who]
    assert _cli(tls_cluster, client, "drain", "host1", "--reason", "test") == cli.EXIT_UNAVAILABLE
    assert "UNAVAILABLE" in capsys.readouterr().err
    # Nothing started: the journal has no drain of host1.
    assert _cli(tls_cluster, pki.operator, "status", "host1") == cli.EXIT_NOT_FOUND


def _bad_requests() -> list[tuple[str, object, str]]:
    uuid_policy = cpb.DrainPolicy()
    uuid_policy.vm_max_downtime_ms["not-a-uuid"] = 500
    zero_policy = cpb.DrainPolicy()
    zero_policy.vm_max_downtime_ms[WEB.uuid] = 0
    return [
        ("PlanDrain", cpb.PlanDrainRequest(host=LONG), "host"),
        ("PlanDrain", cpb.PlanDrainRequest(host="host1;rm"), "host"),
        ("PlanDrain", cpb.PlanDrainRequest(host="host1", policy=uuid_policy), "UUID"),
        ("PlanDrain", cpb.PlanDrainRequest(host="host1", policy=zero_policy), "between 1"),
        (
            "PlanDrain",
            cpb.PlanDrainRequest(host="host1", policy=cpb.DrainPolicy(max_downtime_ms=3_000_000)),
            "max_downtime_ms",
        ),
        (
            "Drain",
            cpb.DrainRequest(host="host1", policy=cpb.DrainPolicy(deadline_s=float("nan"))),
            "deadline_s",
        ),
        (
            "Drain",
            cpb.DrainRequest(host="host1", policy=cpb.DrainPolicy(non_live_action=99)),  # type: ignore[arg-type]
            "non_live_action",
        ),
        (
            "Drain",
            cpb.DrainRequest(host="host1", policy=cpb.DrainPolicy(max_parallel_per_source=65)),
            "max_parallel_per_source",
        ),
        (
            "Drain",
            cpb.DrainRequest(host="host1", policy=cpb.DrainPolicy(target_hosts=["bad host"])),
            "host",
        ),
        ("Drain", cpb.DrainRequest(host="host1", reason="r" * 256), "reason"),
        ("Drain", cpb.DrainRequest(host="host1", reason="ok\nforged log line"), "reason"),
        ("GetDrain", cpb.GetDrainRequest(drain_id=LONG), "drain_id"),
        ("CancelDrain", cpb.CancelDrainRequest(host=LONG), "host"),
        ("Undrain", cpb.UndrainRequest(host=""), "host"),
    ]


def test_bad_input_is_refused_and_starts_nothing(tls_cluster: TlsCluster, pki: Pki) -> None:
    with daemon.channel(
        f"127.0.0.1:{tls_cluster.coordinator.port}", tls_of(pki.operator)
    ) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        for method, request, words in _bad_requests():
            call = getattr(stub, method)
            with pytest.raises(grpc.RpcError) as info:
                answer = call(request, timeout=T)
                if method == "Drain":
                    list(answer)
            err = info.value
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.details())  # type: ignore[attr-defined]
            assert words in err.details(), method  # type: ignore[attr-defined]
        for host in ("host1", "host2"):
            with pytest.raises(grpc.RpcError) as info:
                stub.GetDrain(cpb.GetDrainRequest(host=host), timeout=T)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert tls_cluster.coordinator.journal.latest_drain("host1") is None


@pytest.mark.parametrize(
    ("tls_cluster", "refusal"),
    [("coordinator", "qemu libvirt URI"), ("operator", "not allowed to identity operator")],
    indirect=["tls_cluster"],
)
def test_only_an_allowed_coordinator_may_migrate(
    tls_cluster: TlsCluster, pki: Pki, refusal: str
) -> None:
    """Both coordinators plan and drain over TLS; only the allowed one gets past the
    agent's authorisation (to validation: test:/// URIs are not qemu destinations)."""
    with daemon.channel(
        f"127.0.0.1:{tls_cluster.coordinator.port}", tls_of(pki.operator)
    ) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        events = list(stub.Drain(cpb.DrainRequest(host="host1", reason="bios"), timeout=60))
    final = events[-1].status
    assert final.state == cpb.DRAIN_STATE_INCOMPLETE
    failed = [v for v in final.vms if v.state == cpb.VM_STATE_FAILED]
    assert failed
    for vm in failed:
        assert refusal in vm.error, vm.error
    assert final.summary.migrated == 0
    assert set(tls_cluster.agents) == {"host1", "host2"}
