"""Prints what an agent reports: its host and its domains, as a table.

python -m hostmaint.agent.report 127.0.0.1:7710
"""

from __future__ import annotations

import argparse
import sys

import grpc

from hostmaint.protos import agent_pb2 as pb
from hostmaint.protos import agent_pb2_grpc

_GIB = 1024**3
_MIB = 1024**2


def _tuning(host: pb.HostReport) -> str:
    if not host.HasField("capabilities"):
        return "not reported"
    c = host.capabilities
    return f"vcpu throttle {_capability(c.vcpu_throttle)}, post-copy {_capability(c.postcopy)}"


def _capability(capability: pb.Capability) -> str:
    return "yes" if capability.available else f"no ({capability.reason})"


def render(host: pb.HostReport, domains: list[pb.Domain]) -> str:
    lines = [
        f"host {host.hostname}  {host.hypervisor_type} {host.hypervisor_version}  "
        f"libvirt {host.libvirt_version}  uri {host.libvirt_uri}",
        f"  cpu {host.cpu.arch} {host.cpu.vendor} {host.cpu.model or '-'} "
        f"({len(host.cpu.features)} features), {host.cpu_count} cpus, load {host.load_1m:.2f}",
        f"  memory {host.memory_total_bytes / _GIB:.1f} GiB, free "
        f"{host.memory_free_bytes / _GIB:.1f} GiB; {host.running_domain_count}/"
        f"{host.domain_count} domains running",
        f"  tuning: {_tuning(host)}",
        "",
        f"{'domain':<22} {'nova name':<12} {'flavor':<11} {'state':<9} {'mem':>8} "
        f"{'vcpu':>4} {'dirty':>10}  blockers",
    ]
    for d in domains:
        state = pb.DomainState.Name(d.state).removeprefix("DOMAIN_STATE_").lower()
        dirty = f"{d.dirty_rate.bytes_per_s / _MIB:.1f}MiB/s" if d.HasField("dirty_rate") else "-"
        blockers = "; ".join(("" if b.hard else "(soft) ") + b.reason for b in d.migration_blockers)
        lines.append(
            f"{d.name[:22]:<22} {d.nova.name[:12] or '-':<12} {d.nova.flavor_name[:11] or '-':<11} "
            f"{state:<9} {d.memory_max_bytes / _GIB:>5.1f}GiB {d.vcpus:>4} {dirty:>10}  "
            f"{blockers or 'none'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="print an agent's report")
    parser.add_argument("address", help="host:port of the agent")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    with grpc.insecure_channel(args.address) as ch:
        stub = agent_pb2_grpc.HostAgentStub(ch)
        try:
            host = stub.GetHost(pb.GetHostRequest(), timeout=args.timeout)
            domains = list(stub.ListDomains(pb.ListDomainsRequest(), timeout=args.timeout).domains)
        except grpc.RpcError as e:
            print(f"{args.address}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2
    print(render(host, domains))
    return 0


if __name__ == "__main__":
    sys.exit(main())
