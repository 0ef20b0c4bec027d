"""The lab as a real multi-host cluster: isolation, lifecycle, crash recovery, migration."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import libvirt
import pytest

from hostmaint.lab import cluster, errors, network
from hostmaint.lab.guest import GuestMode, GuestSpec
from hostmaint.lab.state import Role, StateStore, start_ticks_of

from .conftest import IDLE_GUEST, LIFECYCLE_PREFIX, MIGRATING_GUEST

pytestmark = pytest.mark.lab

SMALL_GUEST = GuestSpec(
    name="hm-labx-g",
    memory_mib=128,
    working_set_mib=8,
    dirty_rate_mibps=1,
    mode=GuestMode.PACED,
    fill_mib=8,
)


def _netns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def _host_uuid(uri: str) -> str:
    conn = libvirt.open(uri)
    try:
        caps = conn.getCapabilities()
    finally:
        conn.close()
    start = caps.index("<uuid>") + len("<uuid>")
    return caps[start : caps.index("</uuid>")]


def _processes_mentioning(path: Path) -> list[int]:
    """Live processes whose command line names a path under the lab's state dir."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if str(path).encode() in cmdline and start_ticks_of(int(proc.name)) is not None:
            found.append(int(proc.name))
    return found


def _assert_nothing_left(prefix: str, state_dir: Path, pids: list[tuple[int, int]]) -> None:
    still = [pid for pid, ticks in pids if start_ticks_of(pid) == ticks]
    assert still == [], f"processes left running: {still}"
    assert _processes_mentioning(state_dir) == []
    left_ns = sorted(ns for ns in network.list_netns() if ns.startswith(f"{prefix}-"))
    assert left_ns == [], f"network namespaces left: {left_ns}"
    assert not state_dir.exists(), f"state left: {list(state_dir.rglob('*'))[:10]}"


def test_hosts_are_separate_daemons_with_own_uuid_hostname_and_netns(lab: cluster.Lab) -> None:
    daemons = [lab.state.process(Role.LIBVIRTD, h.name) for h in lab.hosts]
    assert all(d is not None and d.is_alive() for d in daemons)
    pids = [d.pid for d in daemons if d is not None]
    assert len({_netns_of(pid) for pid in pids}) == len(pids)
    assert all(_netns_of(pid) != _netns_of(os.getpid()) for pid in pids)
    for h in lab.hosts:
        conn = libvirt.open(h.uri)
        try:
            assert conn.getHostname() == h.name
        finally:
            conn.close()
    uuids = {_host_uuid(h.uri) for h in lab.hosts}
    assert uuids == {h.uuid for h in lab.state.hosts}
    assert len({h.migration_address for h in lab.hosts}) == len(lab.hosts)
    for h in lab.hosts:
        assert network.qdisc_rate_bits(h.netns) == lab.rate_mbit * 1_000_000


def test_every_guest_runs_exactly_once_and_reports_ready(lab: cluster.Lab) -> None:
    ready = lab.wait_guests_ready(timeout_s=120)
    for g in lab.state.guests:
        assert lab.where(g.name).name == g.initial_host
        assert ready[g.name].name == g.name
        assert ready[g.name].mem_mib <= g.memory_mib


def test_second_up_while_running_refuses(lab: cluster.Lab) -> None:
    config = cluster.LabConfig(
        prefix=lab.state.prefix, state_dir=lab.state_dir, subnet=lab.state.subnet
    )
    with pytest.raises(errors.LabAlreadyRunning) as info:
        cluster.Lab.up(2, [IDLE_GUEST], config)
    assert info.value.state_dir == lab.state_dir
    assert info.value.alive_pids
    # The refused attempt touched nothing: the lab still runs as before.
    assert lab.where(IDLE_GUEST.name).name == lab.state.guests[1].initial_host


def test_live_migration_over_the_shaped_link(lab: cluster.Lab) -> None:
    src = lab.where(MIGRATING_GUEST.name)
    dst = next(h for h in lab.hosts if h.name != src.name)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample_tx() -> None:
        while not stop.is_set():
            before = time.monotonic()
            tx = lab.link_bytes(src)[1]
            samples.append(((before + time.monotonic()) / 2, tx))
            stop.wait(0.1)

    rx_before = lab.link_bytes(dst)[0]
    sampler = threading.Thread(target=sample_tx, name="lab-tx-sampler")
    sampler.start()
    src_conn = libvirt.open(src.uri)
    try:
        dom = src_conn.lookupByName(MIGRATING_GUEST.name)
        started = time.monotonic()
        dom.migrateToURI3(
            dst.uri,
            {libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{dst.migration_address}"},
            libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER,
        )
        elapsed_s = time.monotonic() - started
    finally:
        stop.set()
        sampler.join()
        src_conn.close()
    rx_bytes = lab.link_bytes(dst)[0] - rx_before
    assert lab.where(MIGRATING_GUEST.name).name == dst.name

    dst_conn = libvirt.open(dst.uri)
    try:
        stats = dst_conn.lookupByName(MIGRATING_GUEST.name).jobStats(
            libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED
        )
    finally:
        dst_conn.close()
    windows = [
        (b1 - b0) * 8 / (t1 - t0)
        for i, (t0, b0) in enumerate(samples)
        for (t1, b1) in samples[i + 1 :]
        if 1.0 <= t1 - t0 < 1.15
    ]
    rate_bits = lab.rate_mbit * 1_000_000
    peak_bits = max(windows, default=0.0)
    print(
        f"\nmigration {src.name}->{dst.name}: {rx_bytes / 2**20:.0f} MiB on the wire in "
        f"{elapsed_s:.1f}s, average {rx_bytes * 8 / elapsed_s / 1e6:.0f} Mbit/s, "
        f"peak 1s {peak_bits / 1e6:.0f} Mbit/s, QEMU memory_bps "
        f"{stats.get('memory_bps', 0) * 8 / 1e6:.0f} Mbit/s, downtime {stats.get('downtime')} ms; "
        f"tc rate {lab.rate_mbit} Mbit/s"
    )
    # The stream really crossed the lab link: at least the guest's written memory.
    assert rx_bytes >= MIGRATING_GUEST.fill_mib * 2**20
    # And the link held it to its rate (a token bucket may overshoot by its burst).
    burst_bits = network.burst_bytes(lab.rate_mbit) * 8
    assert peak_bits <= rate_bits * 1.02 + burst_bits
    assert rx_bytes * 8 / elapsed_s <= rate_bits * 1.02
    # The guest's QEMU on the source has gone with it: the lab is still whole, not crashed.
    assert lab.status()["dead_processes"] == []
    config = cluster.LabConfig(
        prefix=lab.state.prefix, state_dir=lab.state_dir, subnet=lab.state.subnet
    )
    with pytest.raises(errors.LabAlreadyRunning):
        cluster.Lab.up(2, [], config)


def _recorded(state_dir: Path) -> list[tuple[int, int]]:
    return [(p.pid, p.start_ticks) for p in StateStore(state_dir).load().processes]


def test_up_then_down_leaves_nothing(lifecycle_config: cluster.LabConfig) -> None:
    stand_in = Path(__file__).with_name("stand_in_agent.py")
    script = lifecycle_config.state_dir.parent / "agent.sh"
    script.write_text(f'#!/bin/sh\nexec {sys.executable} {stand_in} "$@"\n')
    script.chmod(0o755)
    config = dataclasses.replace(lifecycle_config, agents=True, agent_binary=str(script))
    lab, report = cluster.Lab.up(2, [SMALL_GUEST], config)
    recorded = _recorded(config.state_dir)
    assert report.agent_failures == ()
    assert {Role.LIBVIRTD, Role.QEMU, Role.AGENT} <= {p.role for p in lab.state.processes}
    ports = {h.agent_address for h in lab.hosts}
    assert len(ports) == len(lab.hosts)
    for address in ports:
        host, port = address.rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=5).close()
    lab.down()
    _assert_nothing_left(LIFECYCLE_PREFIX, lifecycle_config.state_dir, recorded)


def test_failed_up_rolls_back(lifecycle_config: cluster.LabConfig) -> None:
    missing_kernel = lifecycle_config.state_dir.parent / "missing.elf"
    config = dataclasses.replace(lifecycle_config, kernel=missing_kernel)
    with pytest.raises(errors.GuestStartFailed) as info:
        cluster.Lab.up(2, [SMALL_GUEST], config)
    assert info.value.guest == SMALL_GUEST.name
    _assert_nothing_left(LIFECYCLE_PREFIX, config.state_dir, [])
    assert cluster.down(config.state_dir) == [
        f"no lab state in {config.state_dir}: nothing to stop"
    ]


def test_crash_then_refuse_recover_and_down(lifecycle_config: cluster.LabConfig) -> None:
    lab, _ = cluster.Lab.up(2, [SMALL_GUEST], lifecycle_config)
    try:
        daemons = [p for p in lab.state.processes if p.role is Role.LIBVIRTD]
        qemu = [p for p in lab.state.processes if p.role is Role.QEMU]
        for d in daemons:
            os.kill(d.pid, signal.SIGKILL)
        for d in daemons:
            while d.is_alive():
                time.sleep(0.05)

        with pytest.raises(errors.LabCrashed) as info:
            cluster.Lab.up(2, [SMALL_GUEST], lifecycle_config)
        assert len(info.value.dead) == len(daemons)

        lab, report = cluster.Lab.up(2, [], lifecycle_config, recover=True)
        assert len(report.recovered) == len(daemons)
        # The guest outlived its daemon and the new daemon took it back: same QEMU.
        assert lab.where(SMALL_GUEST.name).name == lab.state.guests[0].initial_host
        assert all(q.is_alive() for q in qemu)

        recorded = _recorded(lifecycle_config.state_dir)
        for p in lab.state.processes:
            if p.role is Role.LIBVIRTD:
                os.kill(p.pid, signal.SIGKILL)
    finally:
        recorded = _recorded(lifecycle_config.state_dir)
        cluster.down(lifecycle_config.state_dir)
    _assert_nothing_left(LIFECYCLE_PREFIX, lifecycle_config.state_dir, recorded)
