"""What every client of the coordinator shares: `hostmaint` (cli.py) and the
`openstack maintenance` commands (hostmaint.osc).

Where the coordinator is and how to reach it (mutual TLS), the drain policy's
options and their checks, the exit code of a gRPC error or of a drain's end,
and a message as JSON. Nothing is sent before the checks pass: a bad argument
raises UsageError.
"""

from __future__ import annotations

import argparse
import math
import queue
import re
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, message

from hostmaint.common import daemon
from hostmaint.coordinator.limits import (
    MAX_DEADLINE_S,
    MAX_DOWNTIME_MS,
    MAX_PARALLEL,
    MAX_POSTCOPY_STRETCH,
)
from hostmaint.protos import coordinator_pb2 as pb
from hostmaint.protos import coordinator_pb2_grpc

DEFAULT_COORDINATOR = "127.0.0.1:7711"
COORDINATOR_ENV = "HOSTMAINT_COORDINATOR"
DEFAULT_TIMEOUT_S = 30.0

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_REFUSED = 4
EXIT_UNAVAILABLE = 5
EXIT_INCOMPLETE = 6
EXIT_FAILED = 7
EXIT_CANCELLED = 8
EXIT_DETACHED = 130

EXIT_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE,
    grpc.StatusCode.OUT_OF_RANGE: EXIT_USAGE,
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_REFUSED,
    grpc.StatusCode.ABORTED: EXIT_REFUSED,
    grpc.StatusCode.ALREADY_EXISTS: EXIT_REFUSED,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
}
EXIT_BY_DRAIN_STATE = {
    pb.DRAIN_STATE_COMPLETED: EXIT_OK,
    pb.DRAIN_STATE_INCOMPLETE: EXIT_INCOMPLETE,
    pb.DRAIN_STATE_FAILED: EXIT_FAILED,
    pb.DRAIN_STATE_CANCELLED: EXIT_CANCELLED,
}

# Bounds of what a request may ask for; outside them a client refuses before sending.
MAX_TIMEOUT_S = 3600.0
MAX_REASON_CHARS = 1000
HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")

Stub = coordinator_pb2_grpc.CoordinatorStub


class UsageError(Exception):
    pass


# ---- checks ------------------------------------------------------------------------------


def check_host(host: str, what: str = "HOST") -> str:
    host = host.strip()
    if not host:
        raise UsageError(f"{what} must not be empty")
    if not HOST_RE.match(host):
        raise UsageError(f"{what} {host!r} is not a host name")
    return host


def check_range(name: str, value: float, low: float, high: float) -> None:
    if not math.isfinite(value) or not low <= value <= high:
        raise UsageError(f"{name} must be between {low:g} and {high:g}, not {value:g}")


def check_address(address: str, option: str = "--coordinator") -> str:
    if address.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"{option} must be HOST:PORT, not {address!r}")
    return address


def check_tls(
    cert: str, key: str, ca: str, names: tuple[str, str, str] = ("--cert", "--key", "--ca")
) -> daemon.TlsFiles:
    """The client's mutual TLS files: none, or all three and each a file."""
    files = (cert, key, ca)
    if any(files):
        if not all(files):
            raise UsageError(f"TLS needs all of {', '.join(names)}")
        for name, path in zip(names, files, strict=True):
            if not Path(path).is_file():
                raise UsageError(f"{name} {path}: no such file")
    return daemon.TlsFiles(cert, key, ca)


def check_timeout(timeout_s: float, option: str = "--timeout") -> float:
    check_range(option, timeout_s, 0.001, MAX_TIMEOUT_S)
    return timeout_s


def check_reason(reason: str) -> str:
    if len(reason) > MAX_REASON_CHARS:
        raise UsageError(f"--reason is longer than {MAX_REASON_CHARS} characters")
    return reason


# ---- the drain policy --------------------------------------------------------------------


def policy_options(parser: argparse.ArgumentParser, host: bool = True) -> None:
    """HOST (unless `host` is False) and the policy's options, as `policy_from_args`
    reads them."""
    if host:
        parser.add_argument("host", metavar="HOST", help="the compute host to drain")
    parser.add_argument(
        "--max-downtime-ms",
        type=int,
        default=None,
        metavar="N",
        help=f"real downtime accepted per VM, 1..{MAX_DOWNTIME_MS} (default: the coordinator's)",
    )
    parser.add_argument(
        "--vm-max-downtime-ms",
        action="append",
        default=[],
        metavar="UUID=N",
        help="a per-VM downtime limit (repeatable)",
    )
    parser.add_argument(
        "--max-parallel",
        type=int,
        default=None,
        metavar="N",
        help=f"migrations at once from the host, 1..{MAX_PARALLEL}",
    )
    parser.add_argument(
        "--max-parallel-per-target",
        type=int,
        default=None,
        metavar="N",
        help=f"migrations at once into one target, 1..{MAX_PARALLEL}",
    )
    parser.add_argument(
        "--allow-postcopy", action="store_true", help="allow post-copy as a last resort"
    )
    parser.add_argument(
        "--postcopy-stretch",
        type=float,
        default=None,
        metavar="F",
        help="with --allow-postcopy: how much longer than the soonest plan (a fraction, "
        f"0..{MAX_POSTCOPY_STRETCH:g}) the drain may take to send fewer VMs through "
        "post-copy; 0: the soonest plan (default: the coordinator's)",
    )
    parser.add_argument(
        "--no-auto-converge", action="store_true", help="forbid auto-converge (vCPU throttling)"
    )
    parser.add_argument(
        "--deadline-s", type=float, default=None, metavar="S", help="seconds the drain may take"
    )
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="HOST",
        help="only migrate to this host (repeatable); default: any enabled host",
    )
    parser.add_argument(
        "--cold-migrate-stopped",
        action="store_true",
        help="cold-migrate shut-off, paused and suspended VMs instead of leaving them",
    )


def policy_from_args(args: argparse.Namespace) -> pb.DrainPolicy:
    """The policy the options ask for, checked; raises UsageError."""
    policy = pb.DrainPolicy(
        allow_postcopy=args.allow_postcopy,
        forbid_auto_converge=args.no_auto_converge,
        non_live_action=(
            pb.NON_LIVE_ACTION_COLD_MIGRATE
            if args.cold_migrate_stopped
            else pb.NON_LIVE_ACTION_UNSPECIFIED
        ),
    )
    # option, its value, its bounds, the policy's field
    limits = (
        ("--max-downtime-ms", args.max_downtime_ms, 1, MAX_DOWNTIME_MS, "max_downtime_ms"),
        ("--max-parallel", args.max_parallel, 1, MAX_PARALLEL, "max_parallel_per_source"),
        (
            "--max-parallel-per-target",
            args.max_parallel_per_target,
            1,
            MAX_PARALLEL,
            "max_parallel_per_target",
        ),
        ("--deadline-s", args.deadline_s, 1, MAX_DEADLINE_S, "deadline_s"),
        (
            "--postcopy-stretch",
            args.postcopy_stretch,
            0,
            MAX_POSTCOPY_STRETCH,
            "postcopy_avoidance_stretch",
        ),
    )
    for option, value, low, high, field in limits:
        if value is not None:
            check_range(option, value, low, high)
            setattr(policy, field, value)
    for item in args.vm_max_downtime_ms:
        vm, sep, value = item.partition("=")
        try:
            vm_uuid = str(uuid.UUID(vm.strip()))
            limit_ms = int(value)
        except ValueError:
            raise UsageError(f"--vm-max-downtime-ms must be UUID=N, not {item!r}") from None
        if not sep:
            raise UsageError(f"--vm-max-downtime-ms must be UUID=N, not {item!r}")
        check_range("--vm-max-downtime-ms", limit_ms, 1, MAX_DOWNTIME_MS)
        policy.vm_max_downtime_ms[vm_uuid] = limit_ms
    targets: list[str] = []
    for target in args.target:
        target = check_host(target, "--target")
        if target == args.host:
            raise UsageError(f"--target {target} is the host being drained")
        if target not in targets:
            targets.append(target)
    policy.target_hosts.extend(targets)
    return policy


# ---- calls and answers -------------------------------------------------------------------


@contextmanager
def connect(address: str, tls: daemon.TlsFiles) -> Iterator[Stub]:
    """A stub on a channel to the coordinator, closed on leaving."""
    with daemon.channel(address, tls) as channel:
        yield coordinator_pb2_grpc.CoordinatorStub(channel)


def rpc_error(err: grpc.RpcError) -> tuple[int, str]:
    """The exit code of a failed call and its one-line description, `CODE: details`."""
    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = err.details() if isinstance(err, grpc.Call) else str(err)
    return EXIT_BY_CODE.get(code, EXIT_ERROR), f"{code.name}: {details or 'no details'}"


def tls_hint(
    err: grpc.RpcError,
    tls: daemon.TlsFiles,
    names: tuple[str, str, str] = ("--cert", "--key", "--ca"),
) -> str:
    """What a call that could not connect says about mutual TLS, or "".

    gRPC tells only "Socket closed" when the coordinator hangs up during the TLS
    handshake (a plaintext client, a client certificate it does not accept) and
    "Ssl handshake failed" when this client does not accept the coordinator's.
    """
    if not isinstance(err, grpc.Call) or err.code() != grpc.StatusCode.UNAVAILABLE:
        return ""
    details = err.details() or ""
    if not tls.configured:
        if "Socket closed" in details:
            return (
                "the coordinator closed the connection: if it requires mutual TLS, "
                f"give {', '.join(names)}"
            )
        return ""
    if "handshake failed" in details.lower():
        return f"the coordinator's certificate does not verify against {names[2]} {tls.ca_file}"
    if "Socket closed" in details:
        return (
            "the coordinator closed the TLS connection: it may not accept "
            f"{names[0]} {tls.cert_file}: a client certificate from its CA, not expired"
        )
    return ""


def to_json(msg: message.Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def pump_stream(call: Iterable[Any], items: queue.Queue[Any], end: object) -> None:
    """Puts each message of a server stream on ``items``, then its error if it broke, then
    ``end`` (a reader thread's whole work, so that the main thread stays interruptible)."""
    try:
        for event in call:
            items.put(event)
    except grpc.RpcError as err:
        items.put(err)
    items.put(end)
