"""hostmaint: the operator's command line for the coordinator.

    hostmaint plan HOST [policy options]        the drain plan, nothing changes
    hostmaint drain HOST [policy options] [--reason TEXT] [--dry-run]
    hostmaint status [HOST] [--drain-id ID]     the latest drain of HOST, or one by id
    hostmaint cancel HOST [--abort-running]     stop starting migrations (abort running ones)
    hostmaint undrain HOST                      re-enable a drained host
    hostmaint agents                            the agents the coordinator knows
    hostmaint roll HOST... | --aggregate NAME [--max-hosts-per-wave N] [--hook CMD]
                   [policy options] [--dry-run]   plan, then roll: drain, hook, back, enable
    hostmaint roll-status [ROLL_ID]             the roll (the latest by default)
    hostmaint roll-cancel [ROLL_ID] [--abort-running]
    hostmaint roll-resume [ROLL_ID] [--skip HOST | --hook-done]   go on with a stopped roll

Global options (before or after the command): --coordinator HOST:PORT (default:
$HOSTMAINT_COORDINATOR, else 127.0.0.1:7711), --timeout S (the deadline of every
unary call; the drain's event stream has none), --json (machine output: one JSON
document per command, for `drain` one JSON object per event, JSON Lines), and
--cert/--key/--ca for mutual TLS.

`drain` shows a live view redrawn in place on a terminal and one line per
event otherwise (--progress forces either), then the summary table. Ctrl-C
detaches: the drain goes on on the coordinator; `hostmaint status HOST` shows it.

Exit codes:
    0  success; for `drain`, the drain COMPLETED
    1  any other error (an unexpected gRPC code, the event stream ended early)
    2  usage: invalid arguments (nothing is sent), or INVALID_ARGUMENT/OUT_OF_RANGE
    3  NOT_FOUND (no such host or drain)
    4  FAILED_PRECONDITION, ABORTED or ALREADY_EXISTS (refused in the current state)
    5  UNAVAILABLE or DEADLINE_EXCEEDED (the coordinator cannot be reached in time)
    6  the drain finished INCOMPLETE (some VMs could not be moved)
    7  the drain FAILED
    8  the drain was CANCELLED
    130  Ctrl-C: detached from a running drain (it continues)
For `roll` and `roll-resume`: 0 the roll COMPLETED, 6 it STOPPED (a host failed; it
waits for roll-resume), 7 FAILED, 8 CANCELLED.
gRPC errors are reported as one line on stderr: `hostmaint: <CODE>: <details>`.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import grpc
from google.protobuf import message

from hostmaint.coordinator import clilive, cliroll, clirollfollow, cliview, report, timeline
from hostmaint.coordinator.client import (
    COORDINATOR_ENV,
    DEFAULT_COORDINATOR,
    DEFAULT_TIMEOUT_S,
    EXIT_BY_DRAIN_STATE,
    EXIT_CANCELLED,
    EXIT_DETACHED,
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_INCOMPLETE,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    MAX_REASON_CHARS,
    Stub,
    UsageError,
    check_address,
    check_host,
    check_reason,
    check_timeout,
    check_tls,
    connect,
    policy_from_args,
    policy_options,
    pump_stream,
    rpc_error,
    to_json,
)
from hostmaint.coordinator.limits import MAX_DOWNTIME_MS
from hostmaint.protos import coordinator_pb2 as pb

__all__ = [  # what tests and scripts read from here
    "COORDINATOR_ENV",
    "EXIT_CANCELLED",
    "EXIT_DETACHED",
    "EXIT_ERROR",
    "EXIT_FAILED",
    "EXIT_INCOMPLETE",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "MAX_DOWNTIME_MS",
    "MAX_REASON_CHARS",
    "main",
]

PROG = "hostmaint"
TICK_S = 0.5  # how often the live view redraws between events
HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"


# ---- arguments ---------------------------------------------------------------------------


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The global options; on sub-commands with SUPPRESS so they work in either place."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        default=default(None),
        help=f"the coordinator (default: ${COORDINATOR_ENV} or {DEFAULT_COORDINATOR})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        default=default(DEFAULT_TIMEOUT_S),
        help=f"deadline of every unary call in seconds (default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="machine-readable output"
    )
    parser.add_argument("--cert", default=default(""), help="client certificate (PEM)")
    parser.add_argument("--key", default=default(""), help="client private key (PEM)")
    parser.add_argument("--ca", default=default(""), help="CA certificate (PEM)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Drain KVM compute hosts for maintenance through the hostmaint coordinator.",
        epilog="Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 refused, 5 unavailable, "
        "6 drain incomplete, 7 drain failed, 8 drain cancelled, 130 detached.",
    )
    _global_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _global_options(sub, suppress=True)
        return sub

    plan = command("plan", "print the plan for draining a host; nothing changes")
    policy_options(plan)

    drain = command("drain", "disable a host and migrate every VM away")
    policy_options(drain)
    drain.add_argument("--reason", default="", metavar="TEXT", help="why (kept with the drain)")
    drain.add_argument("--dry-run", action="store_true", help="print the plan only")
    drain.add_argument(
        "--progress",
        choices=("auto", "live", "lines"),
        default="auto",
        help="live view redrawn in place, or one line per event (default: live on a terminal)",
    )

    status = command("status", "show the latest drain of a host, or a drain by id")
    status.add_argument("host", metavar="HOST", nargs="?", default="")
    status.add_argument("--drain-id", default="", metavar="ID")

    cancel = command("cancel", "stop a drain from starting more migrations")
    cancel.add_argument("host", metavar="HOST")
    cancel.add_argument("--drain-id", default="", metavar="ID")
    cancel.add_argument(
        "--abort-running", action="store_true", help="also abort the migrations running now"
    )

    undrain = command("undrain", "re-enable a drained host")
    undrain.add_argument("host", metavar="HOST")

    command("agents", "list the agents the coordinator knows, with their health")

    roll = command(
        "roll", "roll maintenance over hosts, wave after wave: drain, hook, back, re-enable"
    )
    roll.add_argument("hosts", metavar="HOST", nargs="*", help="the hosts to roll")
    roll.add_argument("--aggregate", default="", metavar="NAME", help="roll this aggregate")
    roll.add_argument(
        "--max-hosts-per-wave", type=int, default=1, metavar="N", help="hosts drained at once"
    )
    roll.add_argument(
        "--hook",
        default="",
        metavar="CMD",
        help="run after each host's drain, with the host's name appended: an executable "
        "in the coordinator's [roll] hook_dir and its arguments",
    )
    roll.add_argument("--hook-timeout-s", type=float, default=0.0, metavar="S")
    roll.add_argument("--back-timeout-s", type=float, default=0.0, metavar="S")
    policy_options(roll, host=False)
    roll.add_argument("--reason", default="", metavar="TEXT", help="why (kept with the roll)")
    roll.add_argument("--dry-run", action="store_true", help="print the plan only")
    roll.add_argument("--progress", choices=("auto", "live", "lines"), default="auto")

    roll_status = command("roll-status", "show a roll (the latest by default)")
    roll_status.add_argument("roll_id", metavar="ROLL_ID", nargs="?", default="")
    roll_cancel = command("roll-cancel", "start no further step of a roll")
    roll_cancel.add_argument("roll_id", metavar="ROLL_ID", nargs="?", default="")
    roll_cancel.add_argument(
        "--abort-running", action="store_true", help="also abort the drains' running migrations"
    )
    roll_resume = command("roll-resume", "go on with a stopped roll")
    roll_resume.add_argument("roll_id", metavar="ROLL_ID", nargs="?", default="")
    roll_resume.add_argument(
        "--skip", default="", metavar="HOST", help="skip this failed host (it stays disabled)"
    )
    roll_resume.add_argument(
        "--hook-done",
        action="store_true",
        help="the failed host's hook did its work: wait for the host instead of running it again",
    )
    roll_resume.add_argument("--progress", choices=("auto", "live", "lines"), default="auto")

    report = command("report", "write a drain's timeline: plan against actual, per VM")
    report.add_argument("drain_id", metavar="DRAIN_ID")
    report.add_argument(
        "--html", required=True, metavar="FILE", help="the self-contained HTML page to write"
    )
    return parser


def _check_args(args: argparse.Namespace) -> None:
    """Everything checkable before a call; raises UsageError."""
    if args.coordinator is None:
        args.coordinator = os.environ.get(COORDINATOR_ENV) or DEFAULT_COORDINATOR
    check_address(args.coordinator)
    check_timeout(args.timeout)
    args.tls = check_tls(args.cert, args.key, args.ca)
    if args.command in ("plan", "drain", "cancel", "undrain"):
        args.host = check_host(args.host)
    if args.command in ("plan", "drain"):
        args.policy = policy_from_args(args)
    if args.command == "drain":
        check_reason(args.reason)
    if args.command == "roll":
        if bool(args.hosts) == bool(args.aggregate):
            raise UsageError("roll needs HOST... or --aggregate NAME (not both)")
        args.hosts = [check_host(h) for h in args.hosts]
        if len(set(args.hosts)) != len(args.hosts):
            raise UsageError("a HOST is named twice")
        if not 1 <= args.max_hosts_per_wave <= 1000:
            raise UsageError("--max-hosts-per-wave must be 1..1000")
        for option, value in (
            ("--hook-timeout-s", args.hook_timeout_s),
            ("--back-timeout-s", args.back_timeout_s),
        ):
            if not 0 <= value <= 7 * 86400:
                raise UsageError(f"{option} must be 0..604800")
        check_reason(args.reason)
        args.host = ""
        args.policy = policy_from_args(args)
    if args.command == "roll-resume":
        if args.skip:
            args.skip = check_host(args.skip, "--skip")
            if args.hook_done:
                raise UsageError("--skip and --hook-done exclude each other")
    if args.command.startswith("roll-"):
        args.roll_id = args.roll_id.strip()
    if args.command == "status":
        if args.host:
            args.host = check_host(args.host)
        if not args.host and not args.drain_id.strip():
            raise UsageError("status needs HOST or --drain-id")
    if args.command in ("status", "cancel") and args.drain_id:
        args.drain_id = args.drain_id.strip()
    if args.command == "report":
        args.drain_id = args.drain_id.strip()
        if not args.drain_id:
            raise UsageError("report needs a DRAIN_ID")
        if not Path(args.html).resolve().parent.is_dir():
            raise UsageError(f"--html {args.html}: no such directory")


# ---- output ------------------------------------------------------------------------------


def _print_message(msg: message.Message, text: str, as_json: bool) -> None:
    out = sys.stdout
    if as_json:
        out.write(json.dumps(to_json(msg), indent=2, sort_keys=True) + "\n")
    else:
        out.write(text + "\n")
    out.flush()


def _rpc_error(err: grpc.RpcError) -> int:
    code, text = rpc_error(err)
    sys.stderr.write(f"{PROG}: {text}\n")
    return code


# ---- commands ----------------------------------------------------------------------------


def cmd_plan(stub: Stub, args: argparse.Namespace) -> int:
    plan = stub.PlanDrain(
        pb.PlanDrainRequest(host=args.host, policy=args.policy), timeout=args.timeout
    )
    _print_message(plan, cliview.render_plan(plan), args.json)
    return EXIT_OK


def cmd_status(stub: Stub, args: argparse.Namespace) -> int:
    request = pb.GetDrainRequest(host=args.host, drain_id=args.drain_id)
    status = stub.GetDrain(request, timeout=args.timeout)
    _print_message(status, cliview.render_status(status, time.time()), args.json)
    return EXIT_OK


def cmd_cancel(stub: Stub, args: argparse.Namespace) -> int:
    request = pb.CancelDrainRequest(
        host=args.host, drain_id=args.drain_id, abort_running=args.abort_running
    )
    status = stub.CancelDrain(request, timeout=args.timeout)
    what = "cancelling (running migrations aborted)" if args.abort_running else "cancelling"
    text = f"{what}: {cliview.render_status(status, time.time())}"
    _print_message(status, text, args.json)
    return EXIT_OK


def cmd_undrain(stub: Stub, args: argparse.Namespace) -> int:
    answer = stub.Undrain(pb.UndrainRequest(host=args.host), timeout=args.timeout)
    state = "enabled" if answer.enabled else "still disabled"
    _print_message(answer, f"host {answer.host or args.host} {state}", args.json)
    return EXIT_OK if answer.enabled else EXIT_ERROR


def cmd_agents(stub: Stub, args: argparse.Namespace) -> int:
    answer = stub.ListAgents(pb.ListAgentsRequest(), timeout=args.timeout)
    _print_message(answer, cliview.render_agents(answer, time.time()), args.json)
    return EXIT_OK


def cmd_drain(stub: Stub, args: argparse.Namespace) -> int:
    if args.dry_run:
        return cmd_plan(stub, args)
    live = args.progress == "live" or (args.progress == "auto" and sys.stdout.isatty())
    request = pb.DrainRequest(host=args.host, policy=args.policy, reason=args.reason)
    follower = DrainFollower(args.host, as_json=args.json, live=live and not args.json)
    return follower.run(lambda: stub.Drain(request))


def cmd_report(stub: Stub, args: argparse.Namespace) -> int:
    history = stub.GetDrainHistory(pb.GetDrainRequest(drain_id=args.drain_id), timeout=args.timeout)
    page = report.render(timeline.build(history))
    Path(args.html).write_text(page, encoding="utf-8")
    kept = f"{len(history.events)} events kept" if history.events else "no events kept"
    _print_message(
        history.status,
        f"wrote {args.html}: drain {history.status.drain_id} of {history.status.host} "
        f"({len(history.status.vms)} VMs, {len(history.steps)} journal steps, {kept})",
        args.json,
    )
    return EXIT_OK


def _roll_request(args: argparse.Namespace) -> pb.RollRequest:
    return pb.RollRequest(
        hosts=args.hosts,
        aggregate=args.aggregate,
        max_hosts_per_wave=args.max_hosts_per_wave,
        hook=args.hook,
        hook_timeout_s=args.hook_timeout_s,
        back_timeout_s=args.back_timeout_s,
        policy=args.policy,
        reason=args.reason,
    )


def _live(args: argparse.Namespace) -> bool:
    live = args.progress == "live" or (args.progress == "auto" and sys.stdout.isatty())
    return live and not args.json


def cmd_roll(stub: Stub, args: argparse.Namespace) -> int:
    request = _roll_request(args)
    if args.dry_run:
        plan = stub.PlanRoll(request, timeout=args.timeout)
        _print_message(plan, cliroll.render_roll_plan(plan), args.json)
        return EXIT_OK
    follower = clirollfollow.RollFollower(as_json=args.json, live=_live(args))
    return follower.run(lambda: stub.Roll(request))


def cmd_roll_status(stub: Stub, args: argparse.Namespace) -> int:
    status = stub.GetRoll(pb.GetRollRequest(roll_id=args.roll_id), timeout=args.timeout)
    _print_message(status, cliroll.render_roll_status(status), args.json)
    return EXIT_OK


def cmd_roll_cancel(stub: Stub, args: argparse.Namespace) -> int:
    request = pb.CancelRollRequest(roll_id=args.roll_id, abort_running=args.abort_running)
    status = stub.CancelRoll(request, timeout=args.timeout)
    _print_message(status, "cancelling: " + cliroll.render_roll_status(status), args.json)
    return EXIT_OK


def cmd_roll_resume(stub: Stub, args: argparse.Namespace) -> int:
    request = pb.ResumeRollRequest(
        roll_id=args.roll_id, skip_host=args.skip, hook_done=args.hook_done
    )
    follower = clirollfollow.RollFollower(as_json=args.json, live=_live(args))
    return follower.run(lambda: stub.ResumeRoll(request))


COMMANDS: dict[str, Callable[[Stub, argparse.Namespace], int]] = {
    "roll": cmd_roll,
    "roll-status": cmd_roll_status,
    "roll-cancel": cmd_roll_cancel,
    "roll-resume": cmd_roll_resume,
    "plan": cmd_plan,
    "drain": cmd_drain,
    "status": cmd_status,
    "cancel": cmd_cancel,
    "undrain": cmd_undrain,
    "agents": cmd_agents,
    "report": cmd_report,
}


# ---- following a drain -------------------------------------------------------------------


class _StreamEnd:
    pass


class DrainFollower:
    """Shows a drain's events as they come; Ctrl-C detaches and leaves the drain running."""

    def __init__(self, host: str, *, as_json: bool, live: bool) -> None:
        self.host = host
        self.as_json = as_json
        self.live = live
        self.view = clilive.LiveView(host=host)
        self.drawn_lines = 0
        self.out: TextIO = sys.stdout

    def run(self, start: Callable[[], Iterator[pb.DrainEvent]]) -> int:
        items: queue.Queue[pb.DrainEvent | grpc.RpcError | _StreamEnd] = queue.Queue()
        call: Any = None
        if self.live:
            self.out.write(HIDE_CURSOR)
        try:
            call = start()
            reader = threading.Thread(
                target=pump_stream,
                args=(call, items, _StreamEnd()),
                name=f"drain-events/{self.host}",
                daemon=True,
            )
            reader.start()
            return self._loop(items)
        except KeyboardInterrupt:
            if call is not None:
                call.cancel()
            self._finish_drawing()
            drain = (
                f"drain {self.view.drain_id} of {self.host}"
                if self.view.drain_id
                else (f"the drain of {self.host}")
            )
            sys.stderr.write(
                f"{PROG}: detached; {drain} continues on the coordinator. "
                f"Follow it with: {PROG} status {self.host}\n"
            )
            return EXIT_DETACHED
        finally:
            if self.live:
                self.out.write(SHOW_CURSOR)
                self.out.flush()

    def _loop(self, items: queue.Queue[pb.DrainEvent | grpc.RpcError | _StreamEnd]) -> int:
        while True:
            try:
                item = items.get(timeout=TICK_S)
            except queue.Empty:
                if self.live:
                    self._draw()
                continue
            if isinstance(item, grpc.RpcError):
                self._finish_drawing()
                code = _rpc_error(item)
                if self.view.drain_id:
                    sys.stderr.write(f"{PROG}: follow the drain with: {PROG} status {self.host}\n")
                return code
            if isinstance(item, _StreamEnd):
                self._finish_drawing()
                sys.stderr.write(
                    f"{PROG}: the event stream ended before the drain finished; "
                    f"follow it with: {PROG} status {self.host}\n"
                )
                return EXIT_ERROR
            self._show(item)
            if self.view.final is not None:
                return self._finished(self.view.final)

    def _show(self, event: pb.DrainEvent) -> None:
        self.view = clilive.apply(self.view, event, time.time())
        if self.as_json:
            self.out.write(json.dumps(to_json(event), sort_keys=True) + "\n")
        elif self.live:
            self._draw()
            return
        else:
            self.out.write(cliview.render_event_line(event) + "\n")
        self.out.flush()

    def _draw(self) -> None:
        size = shutil.get_terminal_size()
        frame = clilive.render_live(self.view, time.time(), size.columns, max(8, size.lines - 1))
        self.out.write(clilive.redraw(self.drawn_lines, frame))
        self.out.flush()
        self.drawn_lines = clilive.frame_height(frame)

    def _finish_drawing(self) -> None:
        """Leaves the last frame on screen; what follows prints below it."""
        self.drawn_lines = 0

    def _finished(self, status: pb.DrainStatus) -> int:
        self._finish_drawing()
        if not self.as_json:
            self.out.write("\n" + cliview.render_summary(status) + "\n")
            self.out.flush()
        return EXIT_BY_DRAIN_STATE.get(status.state, EXIT_ERROR)


# ---- entry point -------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _check_args(args)
    except SystemExit as exit_:  # argparse: --help, or its own usage errors
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    except UsageError as err:
        parser.print_usage(sys.stderr)
        sys.stderr.write(f"{PROG}: error: {err}\n")
        return EXIT_USAGE
    try:
        with connect(args.coordinator, args.tls) as stub:
            return COMMANDS[args.command](stub, args)
    except grpc.RpcError as err:
        return _rpc_error(err)
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return EXIT_DETACHED


if __name__ == "__main__":
    sys.exit(main())
