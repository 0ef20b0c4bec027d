"""An option whose backend is in an extra that is not installed: a clear error, nothing started.

The suite runs with every extra installed, so a missing one is simulated: None
in sys.modules makes its import fail as if it were absent. The daemon's entry
points run in a subprocess, where that holds from the first import on.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hostmaint.common.errors import MissingExtra
from hostmaint.coordinator import ha
from hostmaint.coordinator.journal import make_engine

ETCD_URL = "etcd3+http://127.0.0.1:1"  # nothing listens: an attempt to connect would fail
POSTGRES_URL = "postgresql+psycopg://hostmaint@/hostmaint?host=/nonexistent"
HA_MESSAGE = "[coordination] backend_url needs the 'ha' extra: pip install 'hostmaint[ha]'"
METRICS_MESSAGE = "[metrics] listen needs the 'metrics' extra: pip install 'hostmaint[metrics]'"
POSTGRES_MESSAGE = "[database] url needs the 'postgres' extra: pip install 'hostmaint[postgres]'"


def test_coordination_without_tooz(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tooz", None)
    with pytest.raises(MissingExtra) as raised:
        ha.from_config(ETCD_URL, "g", "", 10, 2.0)
    e = raised.value
    assert (e.option, e.extra, e.module) == ("[coordination] backend_url", "ha", "tooz")
    assert str(e) == f"{HA_MESSAGE} (module 'tooz' is not installed)"


def test_etcd_backend_without_etcd3gw(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "etcd3gw", None)
    with pytest.raises(MissingExtra) as raised:
        ha.from_config(ETCD_URL, "g", "", 10, 2.0)
    assert (raised.value.extra, raised.value.module) == ("ha", "etcd3gw")


def test_other_tooz_backends_need_no_etcd3gw(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "etcd3gw", None)
    member = ha.from_config(f"file://{tmp_path}", "g", "m1", 10, 2.0)
    assert member.member_id == "m1"
    assert not member.is_leader()  # built, not started


def test_postgres_url_without_psycopg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(MissingExtra) as raised:
        make_engine(POSTGRES_URL)
    e = raised.value
    assert (e.option, e.extra, e.module) == ("[database] url", "postgres", "psycopg")
    assert str(e) == f"{POSTGRES_MESSAGE} (module 'psycopg' is not installed)"


def test_defaults_need_no_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for module in ("tooz", "etcd3gw", "psycopg"):
        monkeypatch.setitem(sys.modules, module, None)
    assert isinstance(ha.from_config("", "g", "", 10, 2.0), ha.SingleProcess)
    engine = make_engine(f"sqlite:///{tmp_path / 'j.db'}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("select 1").scalar() == 1
    finally:
        engine.dispose()


# -- the entry points, in a subprocess ------------------------------------------------

RUN = """\
import sys
sys.modules[{module!r}] = None
from {entry} import main
sys.exit(main({argv!r}))
"""


def write_conf(tmp_path: Path, backend_url: str = "", database_url: str = "") -> Path:
    db = database_url or f"sqlite:///{tmp_path / 'state' / 'coordinator.db'}"
    conf = tmp_path / "coordinator.conf"
    conf.write_text(
        "[grpc]\nlisten = 127.0.0.1:0\ngrace_s = 0.5\n"
        "[driver]\nname = libvirt\n"
        f"[database]\nurl = {db}\n"
        f"[coordination]\nbackend_url = {backend_url}\n"
    )
    return conf


def run_without(
    module: str, entry: str, argv: list[str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", RUN.format(module=module, entry=entry, argv=argv)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("module", ["tooz", "etcd3gw"])
def test_coordinator_without_ha_extra_exits_cleanly(tmp_path: Path, module: str) -> None:
    conf = write_conf(tmp_path, backend_url=ETCD_URL)
    got = run_without(module, "hostmaint.coordinator.cmd", ["--config-file", str(conf)], tmp_path)
    assert got.returncode == 2, got.stderr
    assert f"{HA_MESSAGE} (module {module!r} is not installed)" in got.stderr
    assert "Traceback" not in got.stderr
    # Stopped before the journal: no database, not even its directory; no server.
    assert not (tmp_path / "state").exists()
    assert "serving" not in got.stderr


def test_coordinator_without_postgres_extra_exits_cleanly(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, database_url=POSTGRES_URL)
    got = run_without(
        "psycopg", "hostmaint.coordinator.cmd", ["--config-file", str(conf)], tmp_path
    )
    assert got.returncode == 2, got.stderr
    assert POSTGRES_MESSAGE in got.stderr
    assert "Traceback" not in got.stderr
    assert "serving" not in got.stderr


def test_schema_tool_without_postgres_extra_exits_cleanly(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, database_url=POSTGRES_URL)
    got = run_without(
        "psycopg",
        "hostmaint.coordinator.migrations.cli",
        ["--config-file", str(conf), "upgrade"],
        tmp_path,
    )
    assert got.returncode == 2, got.stderr
    assert f"hostmaint-coordinator-db: {POSTGRES_MESSAGE}" in got.stderr
    assert "Traceback" not in got.stderr
    assert got.stdout == ""  # no revision applied


@pytest.mark.parametrize("daemon", ["agent", "coordinator"])
def test_metrics_without_prometheus_client_exit_cleanly(tmp_path: Path, daemon: str) -> None:
    if daemon == "agent":
        conf = tmp_path / "agent.conf"
        conf.write_text(
            "[libvirt]\nuri = test:///default\n[grpc]\nlisten = 127.0.0.1:0\n"
            "[metrics]\nlisten = 127.0.0.1:0\n"
        )
    else:
        conf = write_conf(tmp_path)
        conf.write_text(conf.read_text() + "[metrics]\nlisten = 127.0.0.1:0\n")
    got = run_without(
        "prometheus_client", f"hostmaint.{daemon}.cmd", ["--config-file", str(conf)], tmp_path
    )
    assert got.returncode == 2, got.stderr
    assert f"{METRICS_MESSAGE} (module 'prometheus_client' is not installed)" in got.stderr
    assert "Traceback" not in got.stderr
    assert "serving" not in got.stderr
