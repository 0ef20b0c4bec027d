"""The lab's pieces that need neither root nor a daemon: XML, spec, state, processes."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hostmaint.lab import cluster, domains, errors
from hostmaint.lab.state import (
    GuestRecord,
    HostRecord,
    LabState,
    Phase,
    Role,
    StateStore,
    liveness,
    record_process,
    start_ticks_of,
    stop_process,
)
from tests.lab.conftest import stale_coordinators

DOMCAPS = """<domainCapabilities><cpu>
<mode name='host-passthrough' supported='yes'/>
<mode name='custom' supported='yes'>
  <model usable='yes' vendor='Intel'>qemu64</model>
  <model usable='{usable}' vendor='AMD'>EPYC</model>
</mode></cpu></domainCapabilities>"""


def _config(**overrides: object) -> domains.DomainConfig:
    values: dict[str, object] = {
        "name": "g1",
        "memory_mib": 256,
        "kernel": Path("/lab/guest.elf"),
        "cmdline": "ws=192 rate=40 mode=paced fill=64",
        "serial_path": Path("/lab/serial/g1.log"),
        "accel": domains.Accel.KVM,
        "cpu_model": "EPYC",
    }
    values.update(overrides)
    return domains.DomainConfig(**values)  # type: ignore[arg-type]


def test_domain_xml_boots_the_kernel_with_its_cmdline_and_serial_file() -> None:
    root = ET.fromstring(domains.domain_xml(_config()))
    assert root.get("type") == "kvm"
    assert root.findtext("os/kernel") == "/lab/guest.elf"
    assert root.findtext("os/cmdline") == "ws=192 rate=40 mode=paced fill=64"
    assert root.findtext("memory") == "256" and root.find("memory").get("unit") == "MiB"  # type: ignore[union-attr]
    assert root.findtext("vcpu") == "1"
    source = root.find("devices/serial[@type='file']/source")
    assert source is not None and source.get("path") == "/lab/serial/g1.log"
    assert source.get("append") == "on"
    assert root.findtext("cpu/model") == "EPYC"
    assert root.find("cpu/feature[@name='svm']").get("policy") == "disable"  # type: ignore[union-attr]


def test_domain_xml_for_tcg_and_no_cpu_model() -> None:
    root = ET.fromstring(domains.domain_xml(_config(accel=domains.Accel.TCG, cpu_model="")))
    assert root.get("type") == "qemu"
    assert root.find("cpu") is None


@pytest.mark.parametrize("memory_mib", [64, 127, 2049, 4096])
def test_domain_memory_outside_the_lab_range_is_refused(memory_mib: int) -> None:
    with pytest.raises(ValueError, match="memory_mib"):
        _config(memory_mib=memory_mib)


def test_cpu_model_falls_back_to_qemu_default_when_not_usable() -> None:
    assert domains.choose_cpu_model(DOMCAPS.format(usable="yes")) == "EPYC"
    assert domains.choose_cpu_model(DOMCAPS.format(usable="no")) == ""


def test_accel_is_tcg_without_a_kvm_device(tmp_path: Path) -> None:
    accel, reason = domains.detect_accel(tmp_path / "kvm")
    assert accel is domains.Accel.TCG
    assert "kvm" in reason


def test_guest_spec_from_toml(tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(
        '[[guests]]\nname = "a"\nmemory_mib = 256\nworking_set_mib = 128\n'
        'dirty_rate_mibps = 40\nmode = "paced"\nfill_mib = 64\nhost = 1\n'
        '[[guests]]\nname = "b"\nmemory_mib = 128\nworking_set_mib = 8\n'
        'dirty_rate_mibps = 1\nmode = "paced"\nfill_mib = 8\n'
    )
    plans = cluster.load_guest_plans(spec)
    assert [(p.spec.name, p.host_index) for p in plans] == [("a", 1), ("b", None)]
    assert plans[0].spec.working_set_mib == 128


GUEST_A = '[[guests]]\nname = "a"\nmemory_mib = 256\nworking_set_mib = 8\ndirty_rate_mibps = 1\n'


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('[[guests]]\nname = "a"\nmemory_mib = 256\ncolour = "red"\n', "unknown keys"),
        (GUEST_A + GUEST_A, "unique"),
        (GUEST_A.replace("256", "64"), "memory_mib"),
        ("guests = 3\n", "array of tables"),
        ("[[guests]\n", None),
    ],
)
def test_invalid_guest_spec_is_refused(tmp_path: Path, text: str, reason: str | None) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    with pytest.raises(errors.SpecError, match=reason) as info:
        cluster.load_guest_plans(spec)
    assert info.value.path == spec


def _state(tmp_path: Path) -> LabState:
    return LabState(
        prefix="hm-labu",
        state_dir=str(tmp_path),
        subnet="10.213.9.0/24",
        rate_mbit=400,
        accel="kvm",
        cpu_model="",
        kernel="/k.elf",
        switch_netns="hm-labu-sw",
        bridge="hm-labu-br",
        agents=True,
        phase=Phase.STARTING,
        hosts=(HostRecord("hm-labu-h0", 0, "hm-labu-h0", "10.213.9.11", "/h0", "u-0", 50000),),
        guests=(GuestRecord("g", 256, "fill=1", "hm-labu-h0", "/s/g.log"),),
    )


def test_state_round_trips_through_its_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    me = record_process(Role.AGENT, "hm-labu-h0", os.getpid())
    assert me is not None
    state = _state(tmp_path).with_process(me)
    store.save(state)
    assert store.load() == state
    assert store.load().hosts[0].uri == "qemu+unix:///system?socket=/h0/run/libvirt-sock"


def test_liveness_tells_a_recycled_or_exited_pid_from_ours(tmp_path: Path) -> None:
    child = subprocess.Popen(["sleep", "30"])
    rec = record_process(Role.LIBVIRTD, "hm-labu-h0", child.pid)
    assert rec is not None and rec.is_alive()
    impostor = rec.__class__(rec.role, rec.host, rec.pid, rec.start_ticks + 1)
    state = _state(tmp_path).with_process(rec)
    assert liveness(state).alive == (rec,)
    assert not impostor.is_alive()
    child.kill()
    child.wait()
    assert start_ticks_of(child.pid) is None
    assert liveness(state).dead == (rec,)


def test_a_second_command_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    with store.locked(), pytest.raises(errors.LabBusy), StateStore(tmp_path).locked():
        pass


def test_load_without_state_says_so(tmp_path: Path) -> None:
    with pytest.raises(errors.LabNotRunning):
        StateStore(tmp_path).load()


def test_stale_coordinators_are_those_started_by_earlier_runs(tmp_path: Path) -> None:
    """A coordinator whose config lies under an earlier run's temporary root is stopped;
    this run's and any other are left alone."""
    root = tmp_path / "pytest-of-someone"
    places = {"earlier": root / "pytest-1", "this": root / "pytest-2", "other": tmp_path / "x"}
    procs = {}
    for name, where in places.items():
        where.mkdir(parents=True)
        sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
        procs[name] = subprocess.Popen(
            [*sleeper, "hostmaint-coordinator", "--config-file", str(where / "c.conf")]
        )
    try:
        found = stale_coordinators(root, places["this"])
        assert [p.pid for p in found] == [procs["earlier"].pid]
        assert stop_process(found[0], grace_s=5.0)
        assert not found[0].is_alive()
        assert procs["this"].poll() is None and procs["other"].poll() is None
        assert not stop_process(found[0])  # gone already
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_the_machine_cpuset_is_created_with_its_parents_cpus_and_nodes(tmp_path: Path) -> None:
    root = tmp_path / "cpuset"
    root.mkdir()
    (root / "cpuset.cpus").write_text("0-1\n")
    (root / "cpuset.mems").write_text("0\n")
    mounts = (
        f"cgroup {root} cgroup rw,relatime,cpuset 0 0\n"
        f"cgroup {tmp_path / 'cpu'} cgroup rw,relatime,cpu 0 0\n"
    )
    real_mkdir = Path.mkdir

    def mkdir_like_cgroupfs(self: Path, *args: object, **kwargs: object) -> None:
        real_mkdir(self)
        for key in ("cpuset.cpus", "cpuset.mems"):  # a new cpuset group starts empty
            (self / key).write_text("\n")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "mkdir", mkdir_like_cgroupfs)
        notes = cluster.machine_cpuset(mounts)
    assert (root / "machine" / "cpuset.cpus").read_text() == "0-1\n"
    assert (root / "machine" / "cpuset.mems").read_text() == "0\n"
    assert len(notes) == 3
    assert cluster.machine_cpuset(mounts) == []  # filled already: nothing to do
    assert not (tmp_path / "cpu" / "machine").exists()
