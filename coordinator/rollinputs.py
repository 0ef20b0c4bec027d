"""A roll's inputs from the world, and its plan as the API shows it.

The cloud (the migration driver) says which hosts there are, their memory and vCPU
capacity, their VMs and the VMs' server groups; each host's agent says, where it
answers, its VMs' resident memory and last dirty rate (measured in the background;
nothing is measured for a roll's plan), for the per-host drain predictions. The roll
itself is planned by ``roll.plan_roll`` (pure), each host's drain predicted by
``rollpredict.queued``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from hostmaint.coordinator import errors
from hostmaint.coordinator.agents import AgentRegistry
from hostmaint.coordinator.drivers.base import (
    DriverError,
    HostAggregates,
    Instance,
    InstanceState,
    MigrationDriver,
)
from hostmaint.coordinator.model import DrainPolicy, Link, ServerGroup, VmSpec
from hostmaint.coordinator.roll import plan_roll
from hostmaint.coordinator.rollpredict import queued
from hostmaint.coordinator.rolltypes import RollHost, RollInfeasible, RollPlan, RollPolicy
from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import coordinator_pb2 as cpb

LOG = logging.getLogger(__name__)
MIB = 1024 * 1024


def roll_hosts(driver: MigrationDriver, hosts: Sequence[str], aggregate: str) -> list[str]:
    """The hosts to roll: those named, or the aggregate's; each known to the cloud."""
    try:
        known = {h.name for h in driver.list_hosts()}
        if aggregate:
            if not isinstance(driver, HostAggregates):
                raise errors.InvalidArgument("aggregate", "this cloud's driver has no aggregates")
            hosts = driver.aggregate_hosts(aggregate)
            if not hosts:
                raise errors.InvalidArgument("aggregate", f"{aggregate!r} has no hosts")
    except DriverError as e:
        if e.status == 404:
            raise errors.InvalidArgument("aggregate", f"no aggregate {aggregate!r}") from e
        raise errors.CloudUnavailable(str(e)) from e
    for h in hosts:
        if h not in known:
            raise errors.UnknownHost(h)
    if len(set(hosts)) != len(hosts):
        raise errors.InvalidArgument("hosts", "a host is named twice")
    return sorted(hosts)


def _spec(instance: Instance, domain: apb.Domain | None) -> VmSpec:
    memory = instance.memory_mb * MIB
    nonzero = None
    rate = 0.0
    if domain is not None:
        memory = domain.memory_max_bytes or memory
        if domain.rss_bytes:
            nonzero = min(domain.rss_bytes, memory)
        if domain.HasField("dirty_rate"):
            rate = domain.dirty_rate.bytes_per_s
    return VmSpec(
        uuid=instance.uuid,
        name=instance.name,
        memory_bytes=memory,
        nonzero_bytes=nonzero,
        dirty_rate_bytes_per_s=rate,
        vcpus=max(1, instance.vcpus),
        server_groups=tuple(ServerGroup(g.id, g.policy) for g in instance.server_groups),
    )


def gather_roll(
    driver: MigrationDriver,
    registry: AgentRegistry,
    hosts: Sequence[str],
    cpu_allocation_ratio: float,
    back: Sequence[str] = (),
) -> list[RollHost]:
    """Every host the roll's VMs may go to (all the cloud's enabled hosts, the rolled
    ones, and those `back` in service before them though disabled now) with its capacity
    and VMs. VMs not running stay where they are: they are not moved by the drains, and
    only take room."""
    rolled = set(hosts) | set(back)
    try:
        cloud = driver.list_hosts()
        out = []
        for h in cloud:
            if h.name not in rolled and not (h.enabled and h.up):
                continue  # neither rolled nor a target
            if h.memory_mb is None or h.vcpus is None:
                raise errors.PreconditionFailed(
                    "roll", f"the cloud does not report the capacity of {h.name}"
                )
            instances = driver.list_instances(h.name)
            domains: dict[str, apb.Domain] = {}
            try:
                domains = {d.uuid: d for d in registry.client(h.name).list_domains()}
            except errors.CoordinatorError as e:
                LOG.info("roll plan without the agent's figures host=%s error=%s", h.name, e)
            vms = tuple(
                _spec(i, domains.get(i.uuid)) for i in instances if i.state == InstanceState.ACTIVE
            )
            used = None
            if h.free_memory_mb is not None:
                used = (h.memory_mb - h.free_memory_mb) * MIB
                used = max(used, sum(v.memory_bytes for v in vms))
                used += sum(i.memory_mb * MIB for i in instances if i.state != InstanceState.ACTIVE)
            out.append(
                RollHost(
                    name=h.name,
                    memory_capacity_bytes=h.memory_mb * MIB,
                    pcpus=h.vcpus,
                    cpu_allocation_ratio=cpu_allocation_ratio,
                    vms=vms,
                    memory_used_bytes=used,
                )
            )
    except DriverError as e:
        raise errors.CloudUnavailable(str(e)) from e
    return out


def plan(
    cloud: Sequence[RollHost],
    hosts: Sequence[str],
    max_hosts_per_wave: int,
    maintenance_s: float,
    link_bytes_per_s: float,
    policy: DrainPolicy,
) -> RollPlan:
    """The roll of `hosts` over `cloud`: the hosts not rolled only take VMs (as hosts done
    from the start: they are drained in no wave)."""
    rolled = set(hosts)
    # Hosts that are not rolled receive VMs from the first wave on: the planner's done
    # hosts. The planner drains every host it is given, so they are given to it empty
    # of VMs it would move, with their VMs as memory that stays.
    given = []
    for h in cloud:
        if h.name in rolled:
            given.append(h)
        else:
            kept = h.memory_used_bytes
            if kept is None:
                kept = sum(v.memory_bytes for v in h.vms)
            vcpus = sum(v.vcpus for v in h.vms)
            free_cpus = max(0, h.vcpu_capacity - vcpus)
            given.append(
                RollHost(
                    name=h.name,
                    memory_capacity_bytes=h.memory_capacity_bytes,
                    pcpus=free_cpus,
                    cpu_allocation_ratio=1.0,
                    vms=(),
                    memory_used_bytes=kept,
                )
            )
    try:
        return plan_roll(
            given,
            RollPolicy(max_hosts_per_wave=max(1, max_hosts_per_wave), maintenance_s=maintenance_s),
            queued(Link(link_bytes_per_s), policy),
        )
    except RollInfeasible as e:
        raise errors.PreconditionFailed("roll", str(e)) from e
    except ValueError as e:
        raise errors.PreconditionFailed("roll", str(e)) from e


def plan_to_pb(plan: RollPlan, hosts: Sequence[str], maintenance_s: float) -> cpb.RollPlan:
    rolled = set(hosts)
    out = cpb.RollPlan(
        vm_count=plan.vm_count,
        moves_per_vm=plan.moves_per_vm,
        memory_fill_peak=plan.memory_fill_peak,
        vcpu_fill_peak=plan.vcpu_fill_peak,
        maintenance_s=maintenance_s,
        strategy=plan.strategy,
    )
    index = 0
    total = 0.0
    for w in plan.waves:
        drains = [d for d in w.drains if d.host in rolled]
        if not drains:
            continue
        index += 1
        wave = out.waves.add(
            index=index,
            predicted_drain_s=max(d.predicted_s for d in drains),
            memory_fill_peak=w.memory_fill_peak,
            vcpu_fill_peak=w.vcpu_fill_peak,
        )
        wave.predicted_s = wave.predicted_drain_s + maintenance_s
        total += wave.predicted_s
        for d in drains:
            hp = wave.hosts.add(
                host=d.host, predicted_s=d.predicted_s, bytes_sent=int(d.bytes_sent)
            )
            for m in d.moves:
                hp.moves.add(
                    vm_uuid=m.vm_uuid,
                    vm_name=m.vm_name,
                    source_host=m.source,
                    target_host=m.target,
                    nth=m.nth,
                )
        for p in plan.parked:
            if p.wave == w.index:
                out.parked.add(
                    vm_uuid=p.vm_uuid,
                    vm_name=p.vm_name,
                    wave=index,
                    source_host=p.source,
                    target_host=p.target,
                    reason=p.reason,
                )
    out.predicted_s = total
    return out
