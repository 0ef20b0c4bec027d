"""The demo: drain a lab host of real KVM guests through the coordinator, end to end.

    python -m hostmaint.lab.demo [--spec etc/demo-lab.toml] [--state-dir DIR] [--keep]
                                 [--keep-logs] [--report FILE]

Brings up a lab (hosts, shaped link, agents) with every guest on host 0, writes a
coordinator configuration for the `libvirt` driver, starts `hostmaint-coordinator`
on 127.0.0.1, runs `hostmaint plan` and `hostmaint drain` of host 0 (their output
goes straight to the terminal), prints predicted against actual per VM and checks
that every guest runs exactly once, none of them on host 0 (`--report FILE`
also writes the drain's timeline page, `hostmaint report --html`, while the
coordinator still keeps the drain's events). Whatever happens,
Ctrl-C included, the coordinator and the lab are stopped at the end.

The pieces (settings, the coordinator's configuration, the coordinator as a
child process, the placement check) are also what the lab's drain tests and
benchmark use.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from types import FrameType

import grpc
import libvirt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hostmaint.coordinator import cliformat, cliview
from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import agent_pb2_grpc, coordinator_pb2_grpc
from hostmaint.protos import coordinator_pb2 as cpb

from . import cluster, errors
from .domains import GuestPlan, guest_plans_from_dict

LOG = logging.getLogger(__name__)

DEFAULT_SPEC = Path(__file__).resolve().parent.parent / "etc" / "demo-lab.toml"
COORDINATOR_READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class DemoSettings:
    hosts: int = 3
    rate_mbit: int = cluster.DEFAULT_RATE_MBIT
    max_downtime_ms: int = 1000
    prefix: str = "hm-ldd"
    subnet: str = "10.213.20.0/24"


def load_demo(path: Path) -> tuple[DemoSettings, list[GuestPlan]]:
    """The `[demo]` table and the `[[guests]]` of a demo spec file."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise errors.SpecError(path, str(exc)) from exc
    table = dict(raw.get("demo", {}))
    known = {f.name for f in fields(DemoSettings)}
    unknown = set(table) - known
    if unknown:
        raise errors.SpecError(path, f"[demo]: unknown keys {sorted(unknown)}")
    return DemoSettings(**table), guest_plans_from_dict(raw, path)


# ---- the coordinator ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def coordinator_config(
    lab: cluster.Lab,
    db_path: Path,
    port: int,
    *,
    max_downtime_ms: int = 1000,
    extra: dict[str, dict[str, str]] | None = None,
) -> str:
    """An oslo.config file for a coordinator that drives the lab with the libvirt driver."""
    hosts = lab.hosts
    sections: dict[str, dict[str, str]] = {
        "grpc": {"listen": f"127.0.0.1:{port}", "grace_s": "2"},
        "database": {"url": f"sqlite:///{db_path}"},
        "driver": {"name": "libvirt"},
        "agents": {
            "hosts": ",".join(f"{h.name}:{h.agent_address}" for h in hosts),
            "timeout_s": "20",
            "health_interval_s": "2",
        },
        "libvirt_driver": {
            "uris": ",".join(f"{h.name}:{h.uri}" for h in hosts),
            "migration_addresses": ",".join(f"{h.name}:tcp://{h.migration_address}" for h in hosts),
        },
        "drain": {
            "max_downtime_ms": str(max_downtime_ms),
            # The lab link's rate, each way, in bytes/s.
            "link_bandwidth_bytes_per_s": str(lab.rate_mbit * 1_000_000 // 8),
            "poll_interval_s": "0.5",
            "dirty_rate_window_s": "2",
        },
    }
    for section, values in (extra or {}).items():
        sections.setdefault(section, {}).update(values)
    return "".join(
        f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()) + "\n"
        for name, values in sections.items()
    )


def _script(name: str) -> list[str]:
    """A console script of this installation, or its module run by this interpreter."""
    modules = {
        "hostmaint-coordinator": "hostmaint.coordinator.cmd",
        "hostmaint": "hostmaint.coordinator.cli",
    }
    path = Path(sys.executable).parent / name
    if path.exists():
        return [str(path)]
    return [sys.executable, "-m", modules[name]]


class CoordinatorProcess:
    """`hostmaint-coordinator` as a child process, in its own session (Ctrl-C spares it)."""

    def __init__(self, config_path: Path, port: int, log_path: Path) -> None:
        self.config_path = config_path
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, ready_timeout_s: float = COORDINATOR_READY_TIMEOUT_S) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*_script("hostmaint-coordinator"), "--config-file", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        LOG.info("started coordinator pid=%d port=%d", self.proc.pid, self.port)
        try:
            self._await_serving(ready_timeout_s)
        except BaseException:
            self.kill()  # a coordinator that never became ready is not left behind
            raise

    def _await_serving(self, ready_timeout_s: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + ready_timeout_s
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise errors.LabError(
                        f"coordinator exited with {self.proc.returncode}: see {self.log_path}"
                    )
                try:
                    answer = health.Check(
                        health_pb2.HealthCheckRequest(service="hostmaint.v1.Coordinator"),
                        timeout=5,
                    )
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    raise grpc.RpcError()
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise errors.LabError(
                            f"coordinator not answering after {ready_timeout_s}s: "
                            f"see {self.log_path}"
                        ) from None
                    time.sleep(0.3)

    def kill(self) -> None:
        """SIGKILL: what a crash looks like to the journal."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---- checks ------------------------------------------------------------------------------


def placement(lab: cluster.Lab, guests: Sequence[str]) -> dict[str, list[str]]:
    """Every guest and the hosts it runs on."""
    return {g: [h.name for h in lab.running_on(g)] for g in guests}


def placement_problems(where: dict[str, list[str]], drained_host: str) -> list[str]:
    problems = []
    for guest, hosts in where.items():
        if len(hosts) != 1:
            problems.append(f"{guest} runs on {len(hosts)} hosts {hosts}")
        elif hosts[0] == drained_host:
            problems.append(f"{guest} still runs on {drained_host}")
    return problems


def result_table(status: cpb.DrainStatus, limit_ms: float) -> str:
    """Predicted against actual, per VM, and the real downtime against the limit."""
    rows = []
    for vm in sorted(status.vms, key=lambda v: v.name):
        downtime = vm.actual_downtime_ms
        verdict = "ok" if downtime <= limit_ms else "OVER"
        if vm.state != cpb.VM_STATE_COMPLETED:
            verdict = cliformat.vm_state_label(vm.state)
        rows.append(
            [
                vm.name,
                f"{vm.source_host}->{vm.target_host or '?'}",
                cliformat.tuning_label(vm.tuning),
                ",".join(vm.tuning_applied) or "-",
                f"{vm.predicted_total_s:.1f}",
                f"{vm.actual_total_s:.1f}",
                f"{vm.predicted_downtime_ms}",
                f"{downtime}",
                f"{limit_ms:.0f}",
                verdict,
            ]
        )
    headers = [
        "vm",
        "move",
        "planned tuning",
        "applied",
        "pred s",
        "actual s",
        "pred dt ms",
        "real dt ms",
        "limit ms",
        "",
    ]
    s = status.summary
    footer = (
        f"makespan predicted {s.predicted_makespan_s:.1f}s, actual {s.actual_makespan_s:.1f}s; "
        f"max real downtime {s.max_downtime_ms} ms (limit {limit_ms:.0f} ms); "
        f"migrated {s.migrated}, failed {s.failed}, unmovable {s.unmovable}"
    )
    lines = [cliformat.table(headers, rows, frozenset({4, 5, 6, 7, 8})), footer]
    return "\n".join(lines + cliview.window_lines(status))


def latest_drain(address: str, host: str) -> cpb.DrainStatus:
    with grpc.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        status: cpb.DrainStatus = stub.GetDrain(cpb.GetDrainRequest(host=host), timeout=30)
        return status


def guest_uuid(lab: cluster.Lab, guest: str) -> str:
    conn = libvirt.open(lab.where(guest).uri)
    try:
        return str(conn.lookupByName(guest).UUIDString())
    finally:
        conn.close()


def last_downtime_ms(lab: cluster.Lab, guest: str) -> float | None:
    """QEMU's real downtime of the guest's last finished migration, where it runs now."""
    hosts = lab.running_on(guest)
    if len(hosts) != 1:
        return None
    conn = libvirt.open(hosts[0].uri)
    try:
        # Kept: a read without KEEP_COMPLETED makes libvirt discard them.
        stats = conn.lookupByName(guest).jobStats(
            libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED
        )
    except libvirt.libvirtError:
        return None
    finally:
        conn.close()
    value = stats.get("downtime")
    return float(value) if value is not None else None


def move_guests_to(
    lab: cluster.Lab, guests: Sequence[str], home: cluster.LabHost, timeout_s: float = 300.0
) -> None:
    """Every guest back on `home`, one at a time through its agent, with a lax downtime limit."""
    for guest in guests:
        here = lab.where(guest)
        if here.name == home.name:
            continue
        uuid = guest_uuid(lab, guest)
        with grpc.insecure_channel(here.agent_address) as channel:
            stub = agent_pb2_grpc.HostAgentStub(channel)
            stub.Migrate(
                apb.MigrateRequest(
                    domain_uuid=uuid,
                    destination_uri=home.uri,
                    options=apb.MigrateOptions(
                        max_downtime_ms=10_000, migration_uri=f"tcp://{home.migration_address}"
                    ),
                ),
                timeout=30,
            )
            final = None
            for sample in stub.WatchMigration(
                apb.WatchMigrationRequest(domain_uuid=uuid, interval_s=0.5, start_timeout_s=10),
                timeout=timeout_s,
            ):
                final = sample
        # Where the guest runs is the truth; the watch's last word is only the reason.
        deadline = time.monotonic() + 30
        while [h.name for h in lab.running_on(guest)] != [home.name]:
            if time.monotonic() > deadline:
                raise errors.LabError(f"{guest}: its move to {home.name} failed: {final}")
            time.sleep(0.5)


# ---- the demo ----------------------------------------------------------------------------


def _say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so the teardown in `finally` runs."""

    def raise_interrupt(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _teardown(coordinator: CoordinatorProcess | None, lab_state: Path | None) -> None:
    # A second Ctrl-C must not leave half a lab behind.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _say("teardown")
        if coordinator is not None:
            coordinator.stop()
            print("coordinator stopped", flush=True)
        if lab_state is not None:
            done = cluster.down(lab_state)
            print(f"lab down ({len(done)} steps)", flush=True)
    finally:
        signal.signal(signal.SIGINT, previous)


def run(args: argparse.Namespace) -> int:
    settings, plans = load_demo(args.spec)
    work = Path(tempfile.mkdtemp(prefix="hostmaint-demo-"))
    state_dir = args.state_dir or work / "lab"
    coordinator: CoordinatorProcess | None = None
    lab_state: Path | None = None
    t0 = time.monotonic()
    try:
        with terminate_as_interrupt():
            _say(
                f"lab: {settings.hosts} hosts, links shaped to {settings.rate_mbit} Mbit/s, "
                f"{len(plans)} guests on host 0 (state: {state_dir})"
            )
            for p in plans:
                s = p.spec
                print(
                    f"  {s.name}: {s.memory_mib} MiB, fill {s.fill_mib} MiB, writes "
                    f"{s.working_set_mib} MiB at {s.dirty_rate_mibps:g} MiB/s ({s.mode.value})"
                )
            config = cluster.LabConfig(
                prefix=settings.prefix,
                state_dir=state_dir,
                subnet=settings.subnet,
                rate_mbit=settings.rate_mbit,
            )
            lab_state = state_dir
            lab, report = cluster.Lab.up(settings.hosts, plans, config)
            print(
                f"\n  ACCELERATOR: {report.accel} ({report.accel_reason}); "
                f"guest CPU model {report.cpu_model or '(qemu default)'}"
            )
            print(f"  lab up in {time.monotonic() - t0:.0f}s, phases {report.phases_s}")
            if report.agent_failures:
                raise errors.LabError(f"agents did not start: {report.agent_failures}")
            for h in lab.hosts:
                print(
                    f"  {h.name}: {h.uri}  migration {h.migration_address}  agent {h.agent_address}"
                )
            drained = lab.hosts[0].name

            port = free_port()
            conf_path = work / "coordinator.conf"
            conf_path.write_text(
                coordinator_config(
                    lab, work / "coordinator.db", port, max_downtime_ms=settings.max_downtime_ms
                )
            )
            _say(f"coordinator on 127.0.0.1:{port} (config {conf_path})")
            coordinator = CoordinatorProcess(conf_path, port, work / "coordinator.log")
            coordinator.start()
            cli = [*_script("hostmaint"), "--coordinator", coordinator.address]
            policy = ["--max-downtime-ms", str(settings.max_downtime_ms)]
            subprocess.run([*cli, "agents"], check=False)

            _say(f"hostmaint plan {drained} --max-downtime-ms {settings.max_downtime_ms}")
            subprocess.run([*cli, "plan", drained, *policy], check=False)

            _say(f"hostmaint drain {drained} --max-downtime-ms {settings.max_downtime_ms}")
            t_drain = time.monotonic()
            drain_rc = subprocess.run(
                [*cli, "drain", drained, *policy, "--reason", "demo"], check=False
            ).returncode
            drain_s = time.monotonic() - t_drain

            _say("result")
            status = latest_drain(coordinator.address, drained)
            print(result_table(status, float(settings.max_downtime_ms)))
            if args.report is not None:
                # While the coordinator still keeps the drain's events (rounds, bandwidths).
                subprocess.run(
                    [*cli, "report", status.drain_id, "--html", str(args.report)], check=False
                )
            where = placement(lab, [p.spec.name for p in plans])
            for guest, hosts in sorted(where.items()):
                print(f"  {guest}: running on {', '.join(hosts) or 'NO HOST'}")
            problems = placement_problems(where, drained)
            state = cliformat.drain_state_label(status.state)
            print(
                f"\n  drain {state} in {drain_s:.0f}s (hostmaint exit {drain_rc}); "
                f"accelerator {report.accel}; total so far {time.monotonic() - t0:.0f}s"
            )
            if problems:
                print("  PLACEMENT PROBLEMS: " + "; ".join(problems))
                return 1
            print(f"  every guest runs exactly once, none on {drained}")
            return 0 if status.state == cpb.DRAIN_STATE_COMPLETED else 1
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)
        return 130
    finally:
        if args.keep:
            print(f"--keep: lab and coordinator left running (state {state_dir}, work {work})")
        else:
            _teardown(coordinator, lab_state)
            if args.keep_logs:
                print(f"coordinator log and journal kept in {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
            print(f"demo took {time.monotonic() - t0:.0f}s", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hostmaint.lab.demo", description=__doc__)
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="demo spec (TOML)")
    parser.add_argument("--state-dir", type=Path, default=None, help="the lab's state dir")
    parser.add_argument("--keep", action="store_true", help="leave everything running")
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the coordinator's log and journal"
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="FILE",
        help="write the drain's timeline page (`hostmaint report --html`) to FILE",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log the lab's steps")
    args = parser.parse_args(argv)
    if args.report is not None and not args.report.parent.is_dir():
        parser.error(f"--report: no directory {args.report.parent}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if os.geteuid() != 0:
        print("the demo needs root (network namespaces, mounts)", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
