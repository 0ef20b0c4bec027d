"""Planner inputs from the world: the cloud's view of a host, the agents' measurements.

The cloud (through the migration driver) says which VMs are on the host, their
server groups and which hosts are enabled; the source agent says what libvirt
knows (memory, dirty rate, CPU, blockers) and its readings of dirty rates over
doubling windows (``dirty.writer_of`` reads a working set out of them): those its
background schedule took within ``dirty_rate_max_age_s``, else measured afresh; each
candidate target's agent says its free memory and whether each distinct guest
CPU runs there; every agent's host report says what tuning its host can do.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hostmaint.common.dirty import (
    LONGER_WINDOW_LINK_SHARE,
    Reading,
    Writer,
    next_window_s,
    writer_of,
)
from hostmaint.coordinator import cpucheck, errors
from hostmaint.coordinator.agents import AgentClient, AgentRegistry, Health
from hostmaint.coordinator.drivers.base import (
    DriverError,
    Instance,
    InstanceState,
    MigrationDriver,
)
from hostmaint.coordinator.model import (
    FULLY_CAPABLE,
    HostCapabilities,
    ServerGroup,
    TargetHost,
    VmSpec,
)
from hostmaint.protos import agent_pb2 as apb

LOG = logging.getLogger(__name__)
MIB = 1024 * 1024


@dataclass(frozen=True)
class RateSource:
    """Where the VMs' dirty rates came from: the agent's background readings (how many
    VMs, the oldest reading's age) and a measurement before planning (how many, how long)."""

    background_vms: int = 0
    oldest_background_age_s: float = 0.0
    measured_vms: int = 0
    measuring_s: float = 0.0


@dataclass(frozen=True)
class Inputs:
    host: str
    vms: tuple[VmSpec, ...]
    targets: tuple[TargetHost, ...]
    not_live: tuple[Instance, ...]  # shut off, paused, suspended: not live-migratable
    link_bandwidth_bytes_per_s: float
    domains: dict[str, apb.Domain] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    source: HostCapabilities = FULLY_CAPABLE  # what the source host can tune
    # of the notes, where the dirty rates came from: the agent's background readings (how
    # old) and what was measured before planning (how long); the plan repeats them
    rate_notes: tuple[str, ...] = ()
    rate_source: RateSource = RateSource()


def capabilities_of(report: apb.HostReport | None) -> HostCapabilities:
    """The tuning a host's agent reports it can do; all of it where the agent does not say
    (no report, or an agent from before the report)."""
    if report is None or not report.HasField("capabilities"):
        return FULLY_CAPABLE
    c = report.capabilities
    throttle = c.vcpu_throttle.available or not c.HasField("vcpu_throttle")
    postcopy = c.postcopy.available or not c.HasField("postcopy")
    return HostCapabilities(
        vcpu_throttle=throttle,
        vcpu_throttle_reason="" if throttle else c.vcpu_throttle.reason or "not available",
        postcopy=postcopy,
        postcopy_reason="" if postcopy else c.postcopy.reason or "not available",
    )


def _blockers(domain: apb.Domain | None) -> tuple[str, ...]:
    if domain is None:
        return ()
    return tuple(b.reason for b in domain.migration_blockers if b.hard)


def _vm_spec(
    instance: Instance,
    domain: apb.Domain | None,
    readings: Sequence[Reading],
    max_downtime_ms: float | None,
) -> VmSpec:
    memory = domain.memory_max_bytes if domain is not None else instance.memory_mb * MIB
    nonzero = None
    writer = Writer(0.0)
    cpu_model = ""
    features: frozenset[str] = frozenset()
    if domain is not None:
        if domain.rss_bytes:
            nonzero = min(domain.rss_bytes, memory)
        if readings:
            writer = writer_of(readings)
        elif domain.HasField("dirty_rate"):
            writer = Writer(domain.dirty_rate.bytes_per_s)
        cpu_model = domain.cpu.model
        features = frozenset(f.name for f in domain.cpu.features if f.policy != "disable")
    return VmSpec(
        uuid=instance.uuid,
        name=instance.name,
        memory_bytes=memory,
        nonzero_bytes=nonzero,
        dirty_rate_bytes_per_s=writer.rate_bytes_per_s,
        working_set_bytes=writer.working_set_bytes,
        dirty_rate_floor_bytes_per_s=writer.rate_floor_bytes_per_s,
        vcpus=max(1, instance.vcpus),
        cpu_model=cpu_model,
        cpu_features=features,
        server_groups=tuple(ServerGroup(g.id, g.policy) for g in instance.server_groups),
        blockers=_blockers(domain),
        max_downtime_ms=max_downtime_ms,
    )


def gather(
    host: str,
    driver: MigrationDriver,
    registry: AgentRegistry,
    *,
    link_bandwidth_bytes_per_s: float,
    dirty_rate_window_s: int,
    dirty_rate_max_window_s: int,
    vm_max_downtime_ms: dict[str, int],
    target_hosts: Sequence[str],
    measure: bool = True,
    on_note: Callable[[str], None] | None = None,
    dirty_rate_max_age_s: float = 0.0,
    clock: Callable[[], float] | None = None,
) -> Inputs:
    """Everything the planner needs about a host's drain; raises when the source agent is down."""
    notes: list[str] = []
    rate_notes: list[str] = []

    def rate_note(text: str) -> None:
        rate_notes.append(text)
        note(text)

    def note(text: str) -> None:
        LOG.info("%s host=%s", text, host)
        notes.append(text)
        if on_note is not None:
            on_note(text)

    status = registry.probe(host)
    if status.health != Health.SERVING:
        raise errors.PreconditionFailed(
            f"drain of {host}", f"its agent is not serving ({status.health}: {status.error})"
        )
    source = registry.client(host)
    try:
        instances = driver.list_instances(host)
    except DriverError as e:
        raise errors.CloudUnavailable(str(e)) from e
    domains = {d.uuid: d for d in source.list_domains()}
    live = [i for i in instances if i.state is InstanceState.ACTIVE]
    not_live = tuple(i for i in instances if i.state is not InstanceState.ACTIVE)
    bandwidth = link_bandwidth_bytes_per_s
    if bandwidth <= 0:
        speed = status.report.migration_nic_speed_mbps if status.report is not None else 0
        bandwidth = speed * 1e6 / 8 if speed else 10e9 / 8
        if not speed:
            note("link bandwidth unknown; assuming 10 Gbit/s")
    readings: dict[str, list[Reading]] = {}
    source_of_rates = RateSource()
    # A domain migrating now (a resumed drain) reports its rate in the job stats instead.
    wanted = [i.uuid for i in live if i.uuid in domains and not domains[i.uuid].migrating]
    if measure and wanted and clock is not None and dirty_rate_max_age_s > 0:
        now = clock()
        oldest = now
        for uuid in wanted:
            stored = stored_readings(domains[uuid], dirty_rate_window_s, now - dirty_rate_max_age_s)
            series = [Reading(r.bytes_per_s, r.window_s) for r in stored]
            if series and (
                next_window_s(
                    series,
                    _nonzero(domains[uuid]),
                    dirty_rate_max_window_s,
                    bandwidth * LONGER_WINDOW_LINK_SHARE,
                )
                is None
            ):
                readings[uuid] = series
                main = next(r for r in stored if round(r.window_s) == dirty_rate_window_s)
                domains[uuid].dirty_rate.CopyFrom(main)
                oldest = min([oldest, *(r.measured_at.ToSeconds() for r in stored)])
        if readings:
            source_of_rates = dataclasses.replace(
                source_of_rates,
                background_vms=len(readings),
                oldest_background_age_s=max(0.0, now - oldest),
            )
            rate_note(
                f"dirty rates of {len(readings)} of {len(wanted)} VMs from the agent's "
                f"background readings (the oldest {source_of_rates.oldest_background_age_s:.0f}s old)"
            )
        wanted = [u for u in wanted if u not in readings]
    if measure and wanted:
        started = clock() if clock is not None else None
        try:
            readings.update(
                measure_fresh(
                    source,
                    domains,
                    wanted,
                    dirty_rate_window_s,
                    dirty_rate_max_window_s,
                    bandwidth * LONGER_WINDOW_LINK_SHARE,
                    note,
                )
            )
        except errors.CoordinatorError as e:
            note(f"fresh dirty-rate measurement failed, planning with what was read: {e}")
        if started is not None and clock is not None:
            source_of_rates = dataclasses.replace(
                source_of_rates, measured_vms=len(wanted), measuring_s=clock() - started
            )
            rate_note(
                f"measured the dirty rates of {len(wanted)} VMs in "
                f"{source_of_rates.measuring_s:.1f}s"
            )
    missing = [i.name for i in live if i.uuid not in domains]
    if missing:
        note("no libvirt domain for " + ", ".join(missing) + "; sizes from the flavor")
    vms = tuple(
        _vm_spec(i, domains.get(i.uuid), readings.get(i.uuid, ()), vm_max_downtime_ms.get(i.uuid))
        for i in live
    )
    judge = _CpuJudge(source, status.report.cpu if status.report is not None else None, note)
    targets = _targets(host, driver, registry, judge, vms, domains, target_hosts, note)
    return Inputs(
        host,
        vms,
        targets,
        not_live,
        bandwidth,
        domains,
        tuple(notes),
        source=capabilities_of(status.report),
        rate_notes=tuple(rate_notes),
        rate_source=source_of_rates,
    )


def stored_readings(domain: apb.Domain, window_s: int, not_before: float) -> list[apb.DirtyRate]:
    """The agent's readings of a domain over windows that double from half the window
    (from the window when it is 1 s), each taken at ``not_before`` or later; empty when
    the first two (the first one) are missing or older. A gap in the doubling ends them."""
    by_window = {
        round(r.window_s): r for r in domain.dirty_rates if r.measured_at.ToSeconds() >= not_before
    }
    half = window_s // 2
    w = half if half >= 1 else window_s
    series = []
    while w in by_window:
        series.append(by_window[w])
        w *= 2
    return series if len(series) >= (2 if half >= 1 else 1) else []


def measure_fresh(
    source: AgentClient,
    domains: dict[str, apb.Domain],
    uuids: list[str],
    window_s: int,
    max_window_s: int,
    min_rate: float,
    note: Callable[[str], None],
) -> dict[str, list[Reading]]:
    """What planning measures when it has no recent readings: the domains over the window
    (each domain's ``dirty_rate`` set to it), then ``measure_windows``."""
    rates = source.measure_dirty_rate(uuids, window_s)
    for uuid, rate in rates.items():
        domains[uuid].dirty_rate.CopyFrom(rate)
    return measure_windows(source, domains, rates, window_s, max_window_s, min_rate, note)


def measure_windows(
    source: AgentClient,
    domains: dict[str, apb.Domain],
    rates: dict[str, apb.DirtyRate],
    window_s: int,
    max_window_s: int,
    min_rate: float,
    note: Callable[[str], None],
) -> dict[str, list[Reading]]:
    """Readings over doubling windows: half the configured window, the window, then
    longer ones for the writers of at least ``min_rate`` whose working set they have not
    found yet (dirty.py). A failed longer measurement keeps what the shorter ones read."""
    short_s = max(1, window_s // 2)
    if short_s >= window_s:
        return {}
    shorts = source.measure_dirty_rate(list(rates), short_s)
    readings = {
        u: [Reading(shorts[u].bytes_per_s, shorts[u].window_s), Reading(r.bytes_per_s, window_s)]
        for u, r in rates.items()
        if u in shorts
    }
    longer_s = 2 * window_s
    while longer_s <= max_window_s:
        wanted = [
            u
            for u, rs in readings.items()
            if next_window_s(rs, _nonzero(domains[u]), max_window_s, min_rate) == longer_s
        ]
        if not wanted:
            break
        try:
            found = source.measure_dirty_rate(wanted, longer_s)
        except errors.CoordinatorError as e:
            note(f"dirty-rate measurement over {longer_s}s failed, planning without it: {e}")
            break
        for uuid, rate in found.items():
            readings[uuid].append(Reading(rate.bytes_per_s, longer_s))
        longer_s *= 2
    return readings


def _nonzero(domain: apb.Domain) -> int:
    """The guest memory a window could find written: resident, at most its size."""
    return min(domain.rss_bytes or domain.memory_max_bytes, domain.memory_max_bytes)


def _targets(
    source: str,
    driver: MigrationDriver,
    registry: AgentRegistry,
    judge: _CpuJudge,
    vms: Sequence[VmSpec],
    domains: dict[str, apb.Domain],
    wanted: Sequence[str],
    note: Callable[[str], None],
) -> tuple[TargetHost, ...]:
    try:
        hosts = driver.list_hosts()
    except DriverError as e:
        raise errors.CloudUnavailable(str(e)) from e
    known = {h.name for h in hosts}
    for name in wanted:
        if name not in known:
            raise errors.UnknownHost(name)
    cpus: dict[str, apb.CpuDefinition] = {}
    for vm in vms:
        d = domains.get(vm.uuid)
        if d is not None and (d.cpu.model or d.cpu.xml):
            cpus[vm.uuid] = d.cpu
    names = {vm.uuid: vm.name for vm in vms}
    groups_wanted = {g.id for vm in vms for g in vm.server_groups}
    found = []
    for h in hosts:
        if h.name == source or (wanted and h.name not in wanted):
            continue
        if not h.enabled or not h.up:
            note(f"target {h.name} skipped: {'disabled' if not h.enabled else 'down'}")
            continue
        free_mem = (h.free_memory_mb or 0) * MIB if h.free_memory_mb is not None else None
        free_vcpus = (h.vcpus - (h.vcpus_used or 0)) if h.vcpus is not None else None
        healthy = True
        compatible: frozenset[str] | None = None
        refusals: tuple[tuple[str, str], ...] = ()
        capabilities = FULLY_CAPABLE
        try:
            status = registry.probe(h.name)
        except errors.UnknownHost:
            status = None  # no agent known: the cloud's scheduler checks CPU and capacity
        if status is not None:
            if status.health != Health.SERVING:
                note(f"target {h.name} skipped: agent {status.health} ({status.error})")
                healthy = False
            elif status.report is not None:
                # 0 means the hypervisor does not say (libvirt's test:/// driver, for one).
                free_mem = status.report.memory_free_bytes or free_mem
                compatible, refusals = _cpu_compatible(
                    judge, registry.client(h.name), h.name, cpus, [v.uuid for v in vms], names, note
                )
                capabilities = capabilities_of(status.report)
        groups: frozenset[str] = frozenset()
        if groups_wanted:
            try:
                groups = frozenset(
                    g.id
                    for i in driver.list_instances(h.name)
                    for g in i.server_groups
                    if g.id in groups_wanted
                )
            except DriverError as e:
                note(f"target {h.name} skipped: its VMs cannot be listed ({e})")
                healthy = False
        found.append(
            TargetHost(
                name=h.name,
                free_memory_bytes=free_mem if free_mem is not None else 1 << 62,
                free_vcpus=free_vcpus if free_vcpus is not None else 1 << 30,
                healthy=healthy,
                cpu_compatible=compatible,
                cpu_refusals=refusals,
                server_groups=groups,
                capabilities=capabilities,
            )
        )
    return tuple(found)


class _CpuJudge:
    """Each distinct guest CPU compared once on the source, then on each target (cpucheck)."""

    def __init__(
        self, source: AgentClient, host_cpu: apb.CpuDefinition | None, note: Callable[[str], None]
    ) -> None:
        self._source_agent = source
        self._host_cpu = host_cpu if host_cpu is not None and host_cpu.xml else None
        self._note = note
        self._on_source: dict[str, cpucheck.Comparison] = {}

    @staticmethod
    def _compare(client: AgentClient, cpu: apb.CpuDefinition) -> cpucheck.Comparison:
        a = client.check_cpu(cpu)
        return cpucheck.Comparison(a.compatible, frozenset(a.missing_features), a.reason)

    def _on(self, cpu: apb.CpuDefinition) -> cpucheck.Comparison:
        """The definition compared on the guest's current host."""
        key = _cpu_key(cpu)
        if key not in self._on_source:
            try:
                self._on_source[key] = self._compare(self._source_agent, cpu)
            except errors.AgentRefused as e:
                if e.code != "FAILED_PRECONDITION":
                    raise
                # Judged by the target alone, as if the definition fitted its current host.
                self._note(f"the source cannot compare CPUs ({e.detail}): targets judge alone")
                self._on_source[key] = cpucheck.Comparison(True)
        return self._on_source[key]

    def verdict(self, target: AgentClient, cpu: apb.CpuDefinition) -> cpucheck.CpuVerdict:
        verdict = None
        if cpu.mode not in cpucheck.HOST_CPU_MODES:
            verdict = cpucheck.judge(self._on(cpu), self._compare(target, cpu))
        if cpucheck.needs_host_cpu(cpu.mode, verdict):
            if self._host_cpu is None:
                return verdict or cpucheck.CpuVerdict(
                    False, cpucheck.Rule.UNDECIDED, "the source host's CPU is unknown"
                )
            host = self._host_cpu
            verdict = cpucheck.judge(self._on(host), self._compare(target, host), host_cpu=True)
        assert verdict is not None
        return verdict


def _cpu_key(cpu: apb.CpuDefinition) -> str:
    return cpu.xml or cpu.SerializeToString().hex()


def _cpu_compatible(
    judge: _CpuJudge,
    client: AgentClient,
    host: str,
    cpus: dict[str, apb.CpuDefinition],
    all_vms: Sequence[str],
    names: dict[str, str],
    note: Callable[[str], None],
) -> tuple[frozenset[str] | None, tuple[tuple[str, str], ...]]:
    """The VMs whose CPU the host runs (None when it cannot compare CPUs), and why not
    for each VM it does not run."""
    accepted = set(u for u in all_vms if u not in cpus)  # no CPU model: runs anywhere
    refused: list[tuple[str, str]] = []
    verdicts: dict[str, cpucheck.CpuVerdict] = {}
    for uuid, cpu in cpus.items():
        key = _cpu_key(cpu)
        if key not in verdicts:
            try:
                verdicts[key] = judge.verdict(client, cpu)
            except errors.AgentRefused as e:
                if e.code == "FAILED_PRECONDITION":
                    note(f"target {host} cannot compare CPUs ({e.detail}); the cloud checks")
                    return None, ()
                raise
        verdict = verdicts[key]
        if verdict.compatible:
            accepted.add(uuid)
        else:
            refused.append((uuid, f"CPU: {verdict}"))
        if verdict.rule is not cpucheck.Rule.GUEST_CPU:
            outcome = "runs" if verdict.compatible else "refused"
            note(f"CPU of {names.get(uuid, uuid)} on {host}: {outcome}, {verdict}")
    return frozenset(accepted), tuple(refused)
