"""`hostmaint` against a stand-in coordinator on a real gRPC server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from hostmaint.common import daemon
from hostmaint.coordinator import cli, cliformat, cliview
from hostmaint.protos import coordinator_pb2 as pb
from hostmaint.protos import coordinator_pb2_grpc
from tests.cli import samples
from tests.cli.conftest import WAIT_S, FakeCoordinator, Served
from tests.cli.samples import DB, HOST


def run(served: Served, *argv: str) -> int:
    return cli.main(["--coordinator", served.address, "--timeout", "5", *argv])


def test_plan_prints_the_table_and_sends_the_policy(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(
        served,
        "plan",
        HOST,
        "--max-downtime-ms",
        "500",
        "--max-parallel",
        "2",
        "--max-parallel-per-target",
        "1",
        "--allow-postcopy",
        "--postcopy-stretch",
        "0.05",
        "--no-auto-converge",
        "--deadline-s",
        "3600",
        "--target",
        "compute-02",
        "--target",
        "compute-03",
        "--target",
        "compute-02",
        "--cold-migrate-stopped",
        "--vm-max-downtime-ms",
        f"{DB}=2000",
    )
    assert code == cli.EXIT_OK
    out = capsys.readouterr().out
    assert out.rstrip("\n") == cliview.render_plan(samples.plan())
    [request] = served.fake.called("PlanDrain")
    assert isinstance(request, pb.PlanDrainRequest)
    assert request.host == HOST
    assert request.policy == pb.DrainPolicy(
        max_downtime_ms=500,
        vm_max_downtime_ms={DB: 2000},
        max_parallel_per_source=2,
        max_parallel_per_target=1,
        allow_postcopy=True,
        postcopy_avoidance_stretch=0.05,
        forbid_auto_converge=True,
        deadline_s=3600,
        non_live_action=pb.NON_LIVE_ACTION_COLD_MIGRATE,
        target_hosts=["compute-02", "compute-03"],
    )


def test_plan_json_is_the_plan(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(served, "plan", HOST, "--json") == cli.EXIT_OK
    document = json.loads(capsys.readouterr().out)
    assert json_format.ParseDict(document, pb.DrainPlan()) == samples.plan()
    assert document["migrations"][0]["target_host"] == "compute-02"  # field names as in the proto


def test_global_options_work_after_the_command(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["plan", HOST, "--json", "--coordinator", served.address]) == cli.EXIT_OK
    assert json.loads(capsys.readouterr().out)["host"] == HOST


def test_coordinator_from_the_environment(
    served: Served, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cli.COORDINATOR_ENV, served.address)
    assert cli.main(["agents"]) == cli.EXIT_OK
    assert "compute-07" in capsys.readouterr().out
    assert served.fake.called("ListAgents")


def test_dry_run_plans_and_does_not_drain(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(served, "drain", HOST, "--dry-run", "--max-downtime-ms", "800") == cli.EXIT_OK
    assert [name for name, _ in served.fake.calls] == ["PlanDrain"]
    assert "predicted makespan" in capsys.readouterr().out


def test_drain_prints_one_line_per_event_then_the_summary(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(served, "drain", HOST, "--reason", "BIOS update", "--max-downtime-ms", "500")
    assert code == cli.EXIT_INCOMPLETE  # the sample drain leaves one VM behind
    out = capsys.readouterr().out
    events = served.fake.events
    lines = out.splitlines()
    assert lines[: len(events)] == [cliview.render_event_line(ev) for ev in events]
    assert out.rstrip("\n").endswith(cliview.render_summary(events[-1].status))
    assert "\x1b[" not in out  # not a terminal: no escape sequences
    [request] = served.fake.called("Drain")
    assert isinstance(request, pb.DrainRequest)
    assert (request.host, request.reason, request.policy.max_downtime_ms) == (
        HOST,
        "BIOS update",
        500,
    )


@pytest.mark.parametrize(
    ("state", "exit_code"),
    [
        (pb.DRAIN_STATE_COMPLETED, cli.EXIT_OK),
        (pb.DRAIN_STATE_INCOMPLETE, cli.EXIT_INCOMPLETE),
        (pb.DRAIN_STATE_FAILED, cli.EXIT_FAILED),
        (pb.DRAIN_STATE_CANCELLED, cli.EXIT_CANCELLED),
    ],
)
def test_drain_exit_code_follows_how_it_finished(
    served: Served, capsys: pytest.CaptureFixture[str], state: int, exit_code: int
) -> None:
    served.fake.events = samples.events(state)
    assert run(served, "drain", HOST) == exit_code
    assert f": {cliformat.drain_state_label(state)}" in capsys.readouterr().out


def test_drain_json_lines_one_object_per_event(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    served.fake.events = samples.events(pb.DRAIN_STATE_COMPLETED)
    assert run(served, "drain", HOST, "--json") == cli.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(served.fake.events)
    parsed = [json_format.ParseDict(json.loads(line), pb.DrainEvent()) for line in lines]
    assert parsed == served.fake.events
    assert json.loads(lines[-1])["kind"] == "DRAIN_EVENT_KIND_FINISHED"


def test_live_view_redraws_in_place(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(served, "drain", HOST, "--progress", "live") == cli.EXIT_INCOMPLETE
    out = capsys.readouterr().out
    assert out.startswith(cli.HIDE_CURSOR)
    assert out.endswith(cli.SHOW_CURSOR)
    # The first frame is drawn plain, every later one over the one before.
    assert out.count("\x1b[J") >= len(served.fake.events)
    assert "F\x1b[J" in out
    assert "drain of compute-07" in out and "incomplete" in out
    assert cliview.render_summary(served.fake.events[-1].status) in out


def test_stream_error_reports_the_code_and_how_to_follow(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    served.fake.events = samples.events()[:5]
    served.fake.stream_error = (grpc.StatusCode.ABORTED, "coordinator lost its leadership")
    assert run(served, "drain", HOST) == cli.EXIT_REFUSED
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "hostmaint: ABORTED: coordinator lost its leadership"
    assert err[1] == f"hostmaint: follow the drain with: hostmaint status {HOST}"


def test_stream_ending_before_the_drain_finished(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    served.fake.events = samples.events()[:5]
    assert run(served, "drain", HOST) == cli.EXIT_ERROR
    assert f"hostmaint status {HOST}" in capsys.readouterr().err


@pytest.fixture
def default_sigint() -> Iterator[None]:
    """SIGINT raising KeyboardInterrupt, as Ctrl-C in a terminal: a test run started in
    the background (a shell's `&`, some CI jobs) inherits it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("default_sigint")
def test_ctrl_c_detaches_and_leaves_the_drain_running(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    served.fake.events = samples.events()[:6]
    served.fake.hold_stream = True

    def interrupt() -> None:
        if served.fake.holding.wait(WAIT_S):
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, name="test-interrupt", daemon=True).start()
    assert run(served, "drain", HOST) == cli.EXIT_DETACHED
    err = capsys.readouterr().err
    assert "detached" in err and "continues on the coordinator" in err
    assert f"hostmaint status {HOST}" in err
    assert served.fake.client_gone.wait(WAIT_S)  # the stream was closed ...
    assert not served.fake.called("CancelDrain")  # ... and nothing asked to stop the drain


def test_status_by_host_and_by_id(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(served, "status", HOST) == cli.EXIT_OK
    assert "running" in capsys.readouterr().out
    assert run(served, "status", "--drain-id", samples.DRAIN_ID, "--json") == cli.EXIT_OK
    document = json.loads(capsys.readouterr().out)
    assert document["state"] == "DRAIN_STATE_RUNNING"
    requests = served.fake.called("GetDrain")
    assert requests == [
        pb.GetDrainRequest(host=HOST),
        pb.GetDrainRequest(drain_id=samples.DRAIN_ID),
    ]


def test_cancel_sends_abort_running(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(served, "cancel", HOST, "--abort-running") == cli.EXIT_OK
    assert "cancelling" in capsys.readouterr().out
    assert served.fake.called("CancelDrain") == [
        pb.CancelDrainRequest(host=HOST, abort_running=True)
    ]


def test_undrain(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(served, "undrain", HOST) == cli.EXIT_OK
    assert capsys.readouterr().out == f"host {HOST} enabled\n"
    served.fake.undrain_enabled = False
    assert run(served, "undrain", HOST, "--json") == cli.EXIT_ERROR
    assert json.loads(capsys.readouterr().out) == {"host": HOST, "enabled": False}


def test_agents_table_and_json(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(served, "agents") == cli.EXIT_OK
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["host", "address", "health"]
    assert "UNREACHABLE" in out
    assert run(served, "agents", "--json") == cli.EXIT_OK
    document = json.loads(capsys.readouterr().out)
    assert [a["host"] for a in document["agents"]] == ["compute-07", "compute-02"]


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [
        (grpc.StatusCode.NOT_FOUND, cli.EXIT_NOT_FOUND),
        (grpc.StatusCode.FAILED_PRECONDITION, cli.EXIT_REFUSED),
        (grpc.StatusCode.ABORTED, cli.EXIT_REFUSED),
        (grpc.StatusCode.INVALID_ARGUMENT, cli.EXIT_USAGE),
        (grpc.StatusCode.UNAVAILABLE, cli.EXIT_UNAVAILABLE),
        (grpc.StatusCode.INTERNAL, cli.EXIT_ERROR),
    ],
)
@pytest.mark.parametrize(
    ("method", "argv"),
    [
        ("PlanDrain", ("plan", HOST)),
        ("Drain", ("drain", HOST)),
        ("GetDrain", ("status", HOST)),
        ("CancelDrain", ("cancel", HOST)),
        ("Undrain", ("undrain", HOST)),
        ("ListAgents", ("agents",)),
    ],
)
def test_grpc_errors_become_one_line_and_an_exit_code(
    served: Served,
    capsys: pytest.CaptureFixture[str],
    code: grpc.StatusCode,
    exit_code: int,
    method: str,
    argv: tuple[str, ...],
) -> None:
    served.fake.errors[method] = (code, f"{method} says no")
    assert run(served, *argv) == exit_code
    captured = capsys.readouterr()
    assert captured.err == f"hostmaint: {code.name}: {method} says no\n"
    assert captured.out == ""


def test_nothing_listening_is_unavailable(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        code = cli.main(["--coordinator", f"127.0.0.1:{port}", "--timeout", "5", "agents"])
    assert code == cli.EXIT_UNAVAILABLE
    assert capsys.readouterr().err.startswith("hostmaint: UNAVAILABLE: ")


LONG = "x" * (cli.MAX_REASON_CHARS + 1)


@pytest.mark.parametrize(
    "argv",
    [
        ("plan", ""),
        ("plan", "  "),
        ("drain", "bad host"),
        ("drain", "h1x;rm"),
        ("drain", HOST, "--max-downtime-ms", "0"),
        ("drain", HOST, "--max-downtime-ms", "-5"),
        ("drain", HOST, "--max-downtime-ms", str(cli.MAX_DOWNTIME_MS + 1)),
        ("drain", HOST, "--max-downtime-ms", "fast"),
        ("drain", HOST, "--max-parallel", "0"),
        ("drain", HOST, "--max-parallel", "65"),
        ("plan", HOST, "--max-parallel-per-target", "-1"),
        ("drain", HOST, "--deadline-s", "-1"),
        ("drain", HOST, "--deadline-s", "nan"),
        ("drain", HOST, "--deadline-s", "inf"),
        ("drain", HOST, "--postcopy-stretch", "-0.1"),
        ("drain", HOST, "--postcopy-stretch", "1.5"),
        ("drain", HOST, "--postcopy-stretch", "nan"),
        ("drain", HOST, "--target", HOST),
        ("drain", HOST, "--target", ""),
        ("drain", HOST, "--vm-max-downtime-ms", "not-a-uuid=5"),
        ("drain", HOST, "--vm-max-downtime-ms", f"{DB}=0"),
        ("drain", HOST, "--vm-max-downtime-ms", DB),
        ("drain", HOST, "--reason", LONG),
        ("--timeout", "0", "agents"),
        ("--timeout", "-3", "agents"),
        ("--cert", "/nonexistent/cert.pem", "agents"),
        ("--cert", "/etc/hostname", "--key", "/etc/hostname", "--ca", "/nonexistent", "agents"),
        ("status",),
        ("cancel",),
        ("undrain", ""),
        ("frobnicate", HOST),
        (),
    ],
)
def test_invalid_arguments_send_nothing(
    served: Served, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]
) -> None:
    assert cli.main(["--coordinator", served.address, *argv]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "error:" in err
    assert served.fake.calls == []


@pytest.mark.parametrize("address", ["nohost", "host:0", "host:99999", ":7711", "host:port"])
def test_a_malformed_coordinator_address_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], address: str
) -> None:
    assert cli.main(["--coordinator", address, "agents"]) == cli.EXIT_USAGE
    assert "--coordinator must be HOST:PORT" in capsys.readouterr().err


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == cli.EXIT_OK
    assert "Exit codes" in capsys.readouterr().out


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _make_pki(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=hm-ca",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))  # fmt: skip
    for name, san in (("server", "IP:127.0.0.1"), ("client", "DNS:operator")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))  # fmt: skip
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
                 "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "1",
                 "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.pem"))  # fmt: skip


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mutual_tls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _make_pki(tmp_path)
    fake = FakeCoordinator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="fakecoord"))
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(fake, server)
    server_tls = daemon.TlsFiles(
        str(tmp_path / "server.pem"), str(tmp_path / "server.key"), str(tmp_path / "ca.pem")
    )
    port = server.add_secure_port("127.0.0.1:0", server_tls.server_credentials())
    server.start()
    try:
        base = ["--coordinator", f"127.0.0.1:{port}", "--timeout", "5"]
        tls = ["--cert", str(tmp_path / "client.pem"), "--key", str(tmp_path / "client.key")]
        tls += ["--ca", str(tmp_path / "ca.pem")]
        assert cli.main([*base, *tls, "agents"]) == cli.EXIT_OK
        assert "compute-07" in capsys.readouterr().out
        # Without a client certificate the server does not answer.
        assert cli.main([*base, "agents"]) == cli.EXIT_UNAVAILABLE
        assert capsys.readouterr().err.startswith("hostmaint: UNAVAILABLE: ")
        assert len(fake.called("ListAgents")) == 1
    finally:
        server.stop(0).wait()
