"""A plain install: `pip install -c constraints.txt <source>`, no extras, in a fresh virtualenv.

The rest of the suite runs with every extra installed; this checks what an
operator gets without them: every module of the package imports (but those
that run only inside Nova's own virtualenv or Alembic), both daemons start on
their defaults and answer the standard gRPC health check, and an option whose
backend is in a missing extra stops the coordinator with the extra to install.

The source is a copy of this checkout without its build artefacts and
virtualenvs: setuptools builds in the source tree and packages whatever a
previous build left in `build/lib`, so an install from the checkout itself
could ship modules that no longer exist. The install is not editable, so the
daemons run from site-packages only. pip's cache makes it fast after the
first time; libvirt-python builds from source (a C compiler, libvirt-dev).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = [pytest.mark.install, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
# What the copy leaves out (.gitignore's build artefacts, caches, virtualenvs).
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".venv-*",
    ".tox",
    ".mypy-src",
    "*_cache",
    ".hypothesis",
    "__pycache__",
    "build",
    "dist",
    "*.egg-info",
    "lab-state",
)
EXTRA_MODULES = ("tooz", "etcd3gw", "psycopg", "osc_lib", "cliff")
# Modules of the package that never run in its own environment.
NOT_IMPORTED = {
    "hostmaint.lab.nova_fakedriver": "a Nova compute driver, runs inside Nova's virtualenv",
    "hostmaint.lab.nova_libvirt": "Nova's libvirt driver on the lab, runs inside Nova's virtualenv",
    "hostmaint.coordinator.migrations.env": "Alembic's environment script, run by Alembic",
}
IMPORT_ALL = """\
import importlib, json, pkgutil, sys
import hostmaint
skip = set(json.loads(sys.argv[1]))
failed = {}
for m in pkgutil.walk_packages(hostmaint.__path__, "hostmaint."):
    if m.name in skip:
        continue
    try:
        importlib.import_module(m.name)
    except Exception as e:
        failed[m.name] = f"{type(e).__name__}: {e}"
print(json.dumps(failed))
"""
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class PlainInstall:
    venv: Path
    env: dict[str, str]

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)


def _missing_capability() -> str | None:
    """What this machine lacks to build the package from source, or None."""
    if importlib.util.find_spec("ensurepip") is None:
        return "no ensurepip to create a virtualenv with pip (Debian: python3-venv)"
    if not (shutil.which("cc") or shutil.which("gcc")):
        return "no C compiler (libvirt-python builds from source; Debian: gcc)"
    pkg_config = shutil.which("pkg-config")
    if pkg_config is None or subprocess.run([pkg_config, "--exists", "libvirt"]).returncode:
        return "no libvirt development files (pkg-config libvirt; Debian: libvirt-dev, pkg-config)"
    return None


def _env(venv: Path) -> dict[str, str]:
    """The environment of a shell that activated only the plain virtualenv."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "NOTIFY_SOCKET")
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    return env


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> PlainInstall:
    missing = _missing_capability()
    if missing is not None:
        pytest.skip(f"install: {missing}")
    base = tmp_path_factory.mktemp("plain-install")
    src, venv = base / "src", base / "venv"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = _env(venv)
    started = time.monotonic()
    pip = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-c",
            str(src / "constraints.txt"),
            str(src),
        ],
        cwd=base,
        env=env,
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert pip.returncode == 0, f"pip install failed:\n{_tail(pip.stdout + pip.stderr)}"
    print(f"plain install took {time.monotonic() - started:.1f}s")
    return PlainInstall(venv, env)


def _python(plain: PlainInstall, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(plain.python), "-c", code, *args],
        cwd=plain.venv,
        env=plain.env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_installed_without_extras_and_not_editable(plain: PlainInstall) -> None:
    for module in EXTRA_MODULES:
        got = _python(plain, f"import {module}")
        assert got.returncode != 0, f"{module} is installed: not a plain install"
        assert f"No module named '{module}'" in got.stderr
    got = _python(plain, "import hostmaint.coordinator as c; print(c.__file__)")
    assert got.returncode == 0, got.stderr
    installed = Path(got.stdout.strip())
    assert installed.is_relative_to(plain.venv), f"hostmaint imported from {installed}"
    assert "site-packages" in installed.parts


def test_every_module_imports(plain: PlainInstall) -> None:
    """All but the modules built on an extra, which the daemons load only when configured."""
    got = _python(plain, IMPORT_ALL, json.dumps(sorted(NOT_IMPORTED)))
    assert got.returncode == 0, got.stderr
    no_prometheus = "ModuleNotFoundError: No module named 'prometheus_client'"
    no_osc_lib = "ModuleNotFoundError: No module named 'osc_lib'"
    assert json.loads(got.stdout) == {
        "hostmaint.coordinator.ha_tooz": "ModuleNotFoundError: No module named 'tooz'",
        "hostmaint.common.metrics": no_prometheus,
        "hostmaint.agent.metrics": no_prometheus,
        "hostmaint.coordinator.metrics": no_prometheus,
        "hostmaint.osc.plugin": no_osc_lib,  # loaded by the OpenStack client only
        "hostmaint.osc.v1": no_osc_lib,
    }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def start(plain: PlainInstall, tmp_path: Path) -> Iterator[Callable[[str, str], Daemon]]:
    """Starts `prog --config-file <conf>` from the plain virtualenv; killed if left running."""
    started: list[Daemon] = []

    def run(prog: str, conf_text: str) -> Daemon:
        conf = tmp_path / f"{prog}.conf"
        conf.write_text(conf_text)
        log = tmp_path / f"{prog}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [plain.bin(prog), "--config-file", str(conf)],
                cwd=tmp_path,
                env=plain.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        daemon = Daemon(proc, log)
        started.append(daemon)
        return daemon

    yield run
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def _health(address: str, service: str) -> int | None:
    """The standard health check's status, None while the port does not answer.

    A channel per try: one channel would back off for seconds after the first
    refused connection.
    """
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2.0
            )
        except grpc.RpcError:
            return None
        status: int = reply.status
        return status


def wait_serving(daemon: Daemon, address: str, service: str) -> None:
    """Until the health check answers SERVING for the whole server and for `service`."""
    deadline = time.monotonic() + START_TIMEOUT_S
    serving = health_pb2.HealthCheckResponse.SERVING
    while not (_health(address, "") == serving and _health(address, service) == serving):
        rc = daemon.proc.poll()
        if rc is not None:
            pytest.fail(f"exited with {rc} before serving:\n{_tail(daemon.output())}")
        if time.monotonic() > deadline:
            pytest.fail(f"not SERVING within {START_TIMEOUT_S}s:\n{_tail(daemon.output())}")
        time.sleep(0.1)


def stop_cleanly(daemon: Daemon) -> None:
    daemon.proc.send_signal(signal.SIGTERM)
    rc = daemon.proc.wait(timeout=STOP_TIMEOUT_S)
    output = daemon.output()
    assert rc == 0, f"exit status {rc} after SIGTERM:\n{_tail(output)}"
    assert "Traceback" not in output, output


def coordinator_conf(port: int, database_url: str, backend_url: str = "") -> str:
    # The driver stays the default (nova): its endpoint is the one thing the
    # defaults lack; nothing listens there, and nothing is asked of it before a
    # drain. The journal stays SQLite, in the test's directory rather than the
    # default /var/lib/hostmaint.
    return (
        f"[grpc]\nlisten = 127.0.0.1:{port}\n"
        f"[database]\nurl = {database_url}\n"
        f"[nova]\nendpoint = http://127.0.0.1:{_free_port()}/compute/v2.1\n"
        f"[coordination]\nbackend_url = {backend_url}\n"
    )


def test_daemons_serve_on_their_defaults(
    start: Callable[[str, str], Daemon], tmp_path: Path
) -> None:
    agent_port, coordinator_port = _free_port(), _free_port()
    agent = start(
        "hostmaint-agent",
        f"[libvirt]\nuri = test:///default\n[grpc]\nlisten = 127.0.0.1:{agent_port}\n",
    )
    coordinator = start(
        "hostmaint-coordinator",
        coordinator_conf(coordinator_port, f"sqlite:///{tmp_path / 'coordinator.db'}"),
    )
    wait_serving(agent, f"127.0.0.1:{agent_port}", "hostmaint.v1.HostAgent")
    wait_serving(coordinator, f"127.0.0.1:{coordinator_port}", "hostmaint.v1.Coordinator")
    stop_cleanly(coordinator)
    stop_cleanly(agent)
    assert (tmp_path / "coordinator.db").exists()  # the journal was there


@pytest.mark.parametrize(
    ("extra", "option", "database_url", "backend_url"),
    [
        ("ha", "[coordination] backend_url", "", "etcd3+http://127.0.0.1:1"),
        (
            "postgres",
            "[database] url",
            "postgresql+psycopg://hostmaint@/hostmaint?host=/nonexistent",
            "",
        ),
    ],
    ids=["ha", "postgres"],
)
def test_an_option_of_a_missing_extra_stops_the_coordinator(
    start: Callable[[str, str], Daemon],
    tmp_path: Path,
    extra: str,
    option: str,
    database_url: str,
    backend_url: str,
) -> None:
    state = tmp_path / "state"
    database_url = database_url or f"sqlite:///{state / 'coordinator.db'}"
    coordinator = start(
        "hostmaint-coordinator", coordinator_conf(_free_port(), database_url, backend_url)
    )
    rc = coordinator.proc.wait(timeout=START_TIMEOUT_S)
    output = coordinator.output()
    assert rc == 2, output
    assert f"{option} needs the {extra!r} extra: pip install 'hostmaint[{extra}]'" in output
    assert "Traceback" not in output, output
    assert "serving" not in output, output  # no server was started
    assert not state.exists()  # nor the journal
