"""`hostmaint-lab`: bring the local multi-host KVM lab up, down, or report on it."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from . import cluster, errors

LOG = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hostmaint-lab",
        description="Several KVM hosts on this machine: libvirt daemons in their own "
        "network and mount namespaces, a shaped private link, lab guests and agents.",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="Where the lab keeps its record, configs, sockets and logs "
        "(default $HOSTMAINT_LAB_STATE_DIR or /var/lib/<prefix>).",
    )
    parser.add_argument(
        "--prefix",
        default=cluster.DEFAULT_PREFIX,
        help="Name prefix of the lab's network namespaces and bridge.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Log progress.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="Start the lab hosts, their network, guests and agents.")
    up.add_argument("--hosts", type=int, default=3, help="Number of lab hosts (default 3).")
    up.add_argument("--guests", type=Path, help="TOML guest spec ([[guests]] tables).")
    up.add_argument(
        "--subnet", default=cluster.DEFAULT_SUBNET, help="The lab's private IPv4 subnet."
    )
    up.add_argument(
        "--rate-mbit",
        type=int,
        default=cluster.DEFAULT_RATE_MBIT,
        help="Each host's link rate, each way, in Mbit/s (default 400).",
    )
    up.add_argument("--no-agents", action="store_true", help="Do not start hostmaint agents.")
    up.add_argument(
        "--require-agents",
        action="store_true",
        help="Fail (exit 3) when an agent does not start, instead of reporting it.",
    )
    up.add_argument(
        "--agent-port-base",
        type=int,
        help="Agent of host i listens on 127.0.0.1:<base+i> (default: free ports).",
    )
    up.add_argument(
        "--tcg",
        action="store_true",
        help="Use TCG even when /dev/kvm works (otherwise chosen automatically).",
    )
    up.add_argument(
        "--keep-on-failure",
        action="store_true",
        help="When a fresh up fails, leave what it started (and its logs) for debugging.",
    )
    up.add_argument(
        "--no-wait",
        action="store_true",
        help="Do not wait for the guests to report ready on their serial ports.",
    )
    up.add_argument(
        "--ready-timeout",
        type=float,
        default=300.0,
        help="Seconds to wait for every guest's ready line (default 300).",
    )
    up.add_argument("--kernel", type=Path, help="Guest kernel to boot instead of building one.")
    up.add_argument(
        "--recover",
        action="store_true",
        help="Over the record of a crashed lab: restart what is gone, keep what runs.",
    )
    sub.add_parser("down", help="Stop everything the lab started and remove its state.")
    status = sub.add_parser("status", help="Report hosts, processes and where guests run.")
    status.add_argument("--json", action="store_true", help="Print the status as JSON.")
    return parser


def _state_dir(args: argparse.Namespace) -> Path:
    return args.state_dir or cluster.default_state_dir(args.prefix)


def _up(args: argparse.Namespace) -> int:
    plans = cluster.load_guest_plans(args.guests) if args.guests else []
    config = cluster.LabConfig(
        prefix=args.prefix,
        state_dir=_state_dir(args),
        subnet=args.subnet,
        rate_mbit=args.rate_mbit,
        agents=not args.no_agents,
        agent_port_base=args.agent_port_base,
        kernel=args.kernel,
        wait_guests=not args.no_wait,
        guest_ready_timeout_s=args.ready_timeout,
        rollback_on_failure=not args.keep_on_failure,
        force_tcg=args.tcg,
    )
    t0 = time.monotonic()
    lab, report = cluster.Lab.up(args.hosts, plans, config, recover=args.recover)
    elapsed_s = time.monotonic() - t0
    for note in report.setup_notes:
        print(f"lab setup: {note}")
    for what in report.recovered:
        print(f"recovered: restarted {what}")
    print(f"accelerator: {report.accel} ({report.accel_reason})")
    print(f"cpu model: {report.cpu_model or '(qemu default, no <cpu>)'}")
    print(f"link: {lab.rate_mbit} Mbit/s each way per host, subnet {lab.state.subnet}")
    for h in lab.hosts:
        print(
            f"host {h.name}: uri={h.uri} migration_address={h.migration_address} "
            f"agent={h.agent_address if lab.state.agents else '(disabled)'}"
        )
    for g in lab.state.guests:
        print(f"guest {g.name}: on {g.initial_host}, serial {g.serial_path}")
    for failure in report.agent_failures:
        print(f"AGENT FAILED: {failure}", file=sys.stderr)
    phases = " ".join(f"{name}={secs:.1f}s" for name, secs in report.phases_s)
    print(f"up in {elapsed_s:.1f}s ({phases}); state in {lab.state_dir}")
    if report.agent_failures and args.require_agents:
        return 3
    return 0


def _down(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    for line in cluster.down(_state_dir(args)):
        print(line)
    print(f"down in {time.monotonic() - t0:.1f}s")
    return 0


def _status(args: argparse.Namespace) -> int:
    status = cluster.Lab.load(_state_dir(args)).status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(
        f"lab {status['state_dir']}: phase={status['phase']} accel={status['accel']} "
        f"cpu={status['cpu_model']} subnet={status['subnet']} rate={status['rate_mbit']}Mbit/s"
    )
    for h in status["hosts"]:
        print(
            f"  {h['name']}: libvirtd={h['libvirtd']} agent={h['agent']} "
            f"addr={h['migration_address']} agent_address={h['agent_address']}"
        )
    for guest, hosts in status["guests"].items():
        print(f"  guest {guest}: running on {', '.join(hosts) or 'NO HOST'}")
    for dead in status["dead_processes"]:
        print(f"  DEAD: {dead}")
    for failure in status["agent_failures"]:
        print(f"  AGENT FAILED: {failure}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    handlers = {"up": _up, "down": _down, "status": _status}
    try:
        return handlers[args.command](args)
    except errors.LabError as exc:
        print(f"hostmaint-lab {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
