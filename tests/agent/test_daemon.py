"""hostmaint-agent as systemd runs it: READY after libvirt and the port, clean stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hostmaint.common import daemon
from tests.agent.conftest import DOMAINS
from tests.agent.nodexml import write_node
from tests.ports import free_port


def _agent_bin() -> str:
    return str(Path(sys.executable).parent / "hostmaint-agent")


def test_ready_health_and_sigterm(tmp_path: Path) -> None:
    node = write_node(tmp_path / "node.xml", DOMAINS)
    port = free_port()
    conf = tmp_path / "agent.conf"
    conf.write_text(
        f"[libvirt]\nuri = test://{node}\n[grpc]\nlisten = 127.0.0.1:{port}\ngrace_s = 1\n"
        "[dirty_rate]\nenabled = false\n"
    )
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
    proc = subprocess.Popen(
        [_agent_bin(), "--config-file", str(conf)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        ready = notify.recv(4096).decode()
        assert "READY=1" in ready
        assert str(port) in ready
        probe = subprocess.run(
            [
                sys.executable,
                "-m",
                "hostmaint.common.probe",
                f"127.0.0.1:{port}",
                "--service",
                "hostmaint.v1.HostAgent",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert probe.returncode == 0, probe.stdout
        assert "SERVING" in probe.stdout
        report = subprocess.run(
            [sys.executable, "-m", "hostmaint.agent.report", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert report.returncode == 0, report.stderr
        for d in DOMAINS:
            assert d.name[:22] in report.stdout
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in notify.recv(4096).decode()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    out = proc.stdout.read() if proc.stdout else ""
    assert "stopping on signal" in out


def test_plaintext_off_loopback_is_refused(tmp_path: Path) -> None:
    node = write_node(tmp_path / "node.xml", DOMAINS)
    conf = tmp_path / "agent.conf"
    conf.write_text(f"[libvirt]\nuri = test://{node}\n[grpc]\nlisten = 0.0.0.0:{free_port()}\n")
    proc = subprocess.run(
        [_agent_bin(), "--config-file", str(conf)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "refusing plaintext gRPC" in proc.stderr


def test_probe_reports_unreachable() -> None:
    probe = subprocess.run(
        [
            sys.executable,
            "-m",
            "hostmaint.common.probe",
            f"127.0.0.1:{free_port()}",
            "--timeout",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert probe.returncode == 2
    assert "UNAVAILABLE" in probe.stdout or "DEADLINE" in probe.stdout


def test_a_gone_notify_socket_is_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert daemon.sd_notify("STOPPING=1") is False
    assert "systemd notification failed" in caplog.text
