"""The lab's network: one namespace per host, joined by a bridge private to the lab.

The bridge lives in a namespace of its own (the "switch"), so nothing of the
lab is attached to the machine's own namespace: the lab subnet cannot be
routed off the machine. Each host's NIC (a veth into the switch) is shaped
with a token bucket both ways, on the host's side for what it sends and on the
switch's side for what it receives, so concurrent migrations from or to one
host share its link as they would share a real NIC.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import errors

LOG = logging.getLogger(__name__)

HOST_NIC = "eth0"
# A bucket of this many milliseconds at the link rate, at least 64 KiB so a
# full segment offload fits; latency bounds the queue (and so the RTT).
BURST_MS = 4
MIN_BURST_BYTES = 64 * 1024
QUEUE_LATENCY_MS = 50


@dataclass(frozen=True)
class HostLink:
    netns: str
    switch_port: str
    address: str
    prefix_len: int


def run(cmd: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise errors.NetworkError(cmd, proc.stderr or proc.stdout)
    return proc


def list_netns() -> set[str]:
    proc = run(["ip", "-json", "netns", "list"], check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return set()
    return {entry["name"] for entry in json.loads(proc.stdout)}


def check_subnet_free(subnet: ipaddress.IPv4Network) -> None:
    """Refuse a subnet that overlaps any address or route of the machine's namespace."""
    addrs = json.loads(run(["ip", "-json", "-4", "addr", "show"]).stdout or "[]")
    for link in addrs:
        for info in link.get("addr_info", []):
            net = ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}").network
            if net.overlaps(subnet):
                raise errors.SubnetCollision(str(subnet), f"{net} on {link['ifname']}")
    routes = json.loads(run(["ip", "-json", "-4", "route", "show", "table", "all"]).stdout or "[]")
    for route in routes:
        dst = route.get("dst", "")
        if dst in ("", "default") or route.get("type") in ("broadcast", "local"):
            continue
        net = ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False)
        if net.overlaps(subnet):
            raise errors.SubnetCollision(str(subnet), f"route {dst}")


def host_address(subnet: ipaddress.IPv4Network, index: int) -> str:
    """Host i gets the (10+i)-th address of the subnet, leaving room below for other uses."""
    hosts = list(subnet.hosts())
    if 10 + index >= len(hosts):
        raise errors.LabError(f"subnet {subnet} is too small for host {index}")
    return str(hosts[10 + index])


def burst_bytes(rate_mbit: int) -> int:
    return max(MIN_BURST_BYTES, rate_mbit * 1_000_000 // 8 * BURST_MS // 1000)


def shape(netns: str, dev: str, rate_mbit: int) -> None:
    run(
        [
            "ip", "netns", "exec", netns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
            "rate", f"{rate_mbit}mbit", "burst", str(burst_bytes(rate_mbit)),
            "latency", f"{QUEUE_LATENCY_MS}ms",
        ]
    )  # fmt: skip


def create_switch(switch_netns: str, bridge: str) -> None:
    if switch_netns not in list_netns():
        run(["ip", "netns", "add", switch_netns])
    if run(["ip", "-n", switch_netns, "link", "show", bridge], check=False).returncode != 0:
        run(["ip", "-n", switch_netns, "link", "add", bridge, "type", "bridge"])
    run(["ip", "-n", switch_netns, "link", "set", bridge, "up"])


def attach_host(switch_netns: str, bridge: str, link: HostLink, rate_mbit: int) -> None:
    """Create the host namespace and its NIC, plugged into the bridge, shaped both ways."""
    if link.netns not in list_netns():
        run(["ip", "netns", "add", link.netns])
    run(["ip", "-n", link.netns, "link", "set", "lo", "up"])
    if run(["ip", "-n", link.netns, "link", "show", HOST_NIC], check=False).returncode != 0:
        # Delete a half-made port from an earlier attempt, then make the pair.
        run(["ip", "-n", switch_netns, "link", "del", link.switch_port], check=False)
        run(
            [
                "ip", "-n", switch_netns, "link", "add", link.switch_port, "type", "veth",
                "peer", "name", HOST_NIC, "netns", link.netns,
            ]
        )  # fmt: skip
    run(["ip", "-n", switch_netns, "link", "set", link.switch_port, "master", bridge, "up"])
    run(
        [
            *("ip", "-n", link.netns, "addr", "replace"),
            *(f"{link.address}/{link.prefix_len}", "dev", HOST_NIC),
        ]
    )
    run(["ip", "-n", link.netns, "link", "set", HOST_NIC, "up"])
    shape(link.netns, HOST_NIC, rate_mbit)
    shape(switch_netns, link.switch_port, rate_mbit)


def delete_netns(names: list[str]) -> list[str]:
    """Delete those of the named namespaces that exist; return the names deleted."""
    present = list_netns()
    deleted = []
    for name in names:
        if name in present:
            run(["ip", "netns", "del", name])
            deleted.append(name)
    return deleted


def link_bytes(pid: int, dev: str = HOST_NIC) -> tuple[int, int]:
    """(rx_bytes, tx_bytes) of a device in the network namespace of process pid.

    Read from /proc/<pid>/net/dev, which shows that process's namespace: a file
    read, cheap enough to sample a link many times a second.
    """
    for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]:
        name, _, counters = line.partition(":")
        if name.strip() == dev:
            fields = counters.split()
            return int(fields[0]), int(fields[8])
    raise errors.LabError(f"no device {dev} in the network namespace of pid {pid}")


def qdisc_rate_bits(netns: str, dev: str = HOST_NIC) -> int:
    """The rate of the token bucket on a device, in bit/s (0 when it is not shaped)."""
    proc = run(["ip", "netns", "exec", netns, "tc", "-json", "qdisc", "show", "dev", dev])
    for qdisc in json.loads(proc.stdout or "[]"):
        if qdisc.get("kind") == "tbf":
            return int(qdisc["options"]["rate"]) * 8
    return 0
