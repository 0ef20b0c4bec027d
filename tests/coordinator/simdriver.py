"""A simulated cloud behind the MigrationDriver contract, for load tests and benchmarks.

Nothing moves anywhere: the cloud is a table of where each VM runs. A live
migration started here finishes after the time the convergence model predicts
for that VM alone at the link's bandwidth (with the start's downtime limit and
bandwidth cap), multiplied by `time_scale`; while it runs, the status reports
memory progress in proportion to the time elapsed. When it completes the VM's
placement moves to the target in one step, under the driver's lock, so at any
instant every VM is on exactly one host.

What it checks like a cloud would (Nova's conductor and scheduler): a target
must be named, known, enabled, not the source, with room for the VM's memory
and vCPUs (a running migration holds its claim on the target); a VM already
migrating refuses another start. What it does not model: concurrent migrations
sharing a link, dirty pages, failures. It exercises the coordinator (journal,
dispatch, streaming, threads), not the physics; the simulator in
`hostmaint.coordinator.simulator` is the tool for the physics. The migrations of
the VMs named in `precopy_never_ends` (writers faster than the link) end only
when forced (post-copy), aborted or completed by the test (`complete`).

A link cut during post-copy (`postcopy_cuts`: VM -> seconds the link stays down,
None for ever) turns the VM's post-copy switch into a broken post-copy, as libvirt
8.5+ leaves one: the migration stays running in the cloud's record, paused, and
`resume_postcopy` is refused until the link is back (then the post-copy ends a
moment later); `postcopy_target` says the target holds the guest, or, for the VMs in
`target_lost`, that it has no copy any more. An abort of a post-copy is refused (and
counted in `aborts_in_postcopy`), as libvirt refuses it.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from hostmaint.coordinator.convergence import run_alone
from hostmaint.coordinator.drivers.base import (
    ComputeHost,
    Conflict,
    Instance,
    InstanceState,
    InvalidRequest,
    LiveMigrationOptions,
    MigrationKind,
    MigrationRef,
    MigrationState,
    MigrationStatus,
    NotFound,
    TargetHalf,
    Unavailable,
)
from hostmaint.coordinator.model import (
    DEFAULT_PARAMS,
    Link,
    ModelParams,
    Outcome,
    Settings,
    VmSpec,
    effective_bandwidth,
)

MIB = 1024 * 1024


@dataclass(frozen=True)
class SimHost:
    name: str
    memory_mb: int
    vcpus: int


@dataclass
class _Migration:
    ref: MigrationRef
    source: str
    target: str
    memory_bytes: int
    started_s: float
    duration_s: float
    state: MigrationState = MigrationState.RUNNING
    ended_s: float | None = None
    postcopy: bool = False
    paused_until: float | None = None  # a broken post-copy: when its link is back


@dataclass(frozen=True)
class Start:
    """One migration started, as the simulated cloud was asked for it."""

    instance_uuid: str
    target: str
    options: LiveMigrationOptions


@dataclass(frozen=True)
class Move:
    """One completed migration, as the simulated cloud recorded it."""

    instance_uuid: str
    source: str
    target: str
    started_s: float
    ended_s: float


@dataclass
class _Vm:
    instance: Instance
    host: str
    migrations: list[_Migration] = field(default_factory=list)


class SimDriver:
    """A MigrationDriver over a table of hosts and VMs; `clock` is seconds (monotonic)."""

    can_cold_migrate = False  # cold_migrate refuses: the simulated cloud has none
    can_resume_postcopy = True
    resume_tail_s = 0.05  # a resumed post-copy ends this long after its resume

    def __init__(
        self,
        hosts: Iterable[SimHost],
        instances: Iterable[Instance],
        *,
        clock: Callable[[], float],
        link: Link,
        time_scale: float = 0.01,
        params: ModelParams = DEFAULT_PARAMS,
        precopy_never_ends: Iterable[str] = (),
        error_after_abort: bool = False,
        error_delay_s: float = 0.0,
        postcopy_cuts: dict[str, float | None] | None = None,
        target_lost: Iterable[str] = (),
        aggregates: dict[str, list[str]] | None = None,
    ) -> None:
        self._aggregates = dict(aggregates or {})
        self.down: set[str] = set()  # hosts whose compute service is down
        self._hosts = {h.name: h for h in hosts}
        self._vms: dict[str, _Vm] = {}
        for inst in instances:
            if inst.host not in self._hosts:
                raise ValueError(f"{inst.uuid} is on unknown host {inst.host}")
            self._vms[inst.uuid] = _Vm(inst, inst.host)
        self._clock = clock
        self._bandwidth = effective_bandwidth(link, params)
        self._time_scale = time_scale
        self._params = params
        self._disabled: dict[str, str] = {}
        self._lock = threading.Lock()
        self._next_id = 1
        self._moves: list[Move] = []
        self._never_ends = frozenset(precopy_never_ends)
        self._starts: list[Start] = []
        self.migrations_started = 0
        # As Nova 34.0.0: an aborted live migration leaves the VM in error.
        self._error_after_abort = error_after_abort
        self._error_delay_s = error_delay_s  # after the abort, as Nova's is a moment later
        self.error_settle_s = error_delay_s + 1.0 if error_after_abort else 0.0
        self._errors_due: dict[str, float] = {}
        self.resets: list[str] = []
        self._cuts = dict(postcopy_cuts or {})
        self._target_lost = frozenset(target_lost)
        self.aborts_in_postcopy: list[str] = []
        self.resume_tries: list[tuple[str, float, bool]] = []  # vm, when, taken

    # -- time -----------------------------------------------------------------------

    def _advance(self) -> None:
        """Completes every migration whose time is up; call with the lock held."""
        now = self._clock()
        for vm in self._vms.values():
            for m in vm.migrations:
                if m.paused_until is not None:
                    continue  # a broken post-copy ends only once resumed
                if m.state is MigrationState.RUNNING and now >= m.started_s + m.duration_s:
                    self._complete(vm, m, m.started_s + m.duration_s)
        for uuid, due in list(self._errors_due.items()):
            if now >= due:
                vm = self._vms[uuid]
                vm.instance = dataclasses.replace(vm.instance, state=InstanceState.ERROR)
                del self._errors_due[uuid]

    def _complete(self, vm: _Vm, m: _Migration, at_s: float) -> None:
        m.state = MigrationState.COMPLETED
        m.ended_s = at_s
        vm.host = m.target
        self._moves.append(Move(vm.instance.uuid, m.source, m.target, m.started_s, at_s))

    def _duration_s(self, vm: _Vm, options: LiveMigrationOptions) -> float:
        inst = vm.instance
        if inst.uuid in self._never_ends:
            return float("inf")
        spec = VmSpec(inst.uuid, inst.name, inst.memory_mb * MIB, vcpus=max(1, inst.vcpus))
        settings = Settings(
            downtime_limit_ms=float(
                options.max_downtime_ms or self._params.qemu_default_downtime_ms
            ),
            auto_converge=options.auto_converge,
            postcopy_permitted=options.allow_postcopy,
            max_bandwidth_bytes_per_s=float(options.bandwidth_bytes_per_s) or None,
        )
        mig = run_alone(spec, self._bandwidth, settings, self._params)
        if mig.outcome is not Outcome.COMPLETED or mig.end_s is None:
            return self._params.horizon_s * self._time_scale
        return (mig.end_s - mig.start_s) * self._time_scale

    # -- hosts ----------------------------------------------------------------------

    def _host(self, name: str) -> SimHost:
        host = self._hosts.get(name)
        if host is None:
            raise NotFound(f"unknown compute host {name!r}")
        return host

    def disable_host(self, host: str, reason: str) -> None:
        with self._lock:
            self._host(host)
            self._disabled[host] = reason

    def enable_host(self, host: str) -> None:
        with self._lock:
            self._host(host)
            self._disabled.pop(host, None)

    def host_enabled(self, host: str) -> bool:
        with self._lock:
            self._host(host)
            return host not in self._disabled

    def _used(self, host: str) -> tuple[int, int]:
        """Memory (MB) and vCPUs held on `host`: its VMs plus claims of migrations to it."""
        mem = vcpus = 0
        for vm in self._vms.values():
            here = vm.host == host or any(
                m.state is MigrationState.RUNNING and m.target == host for m in vm.migrations
            )
            if here:
                mem += vm.instance.memory_mb
                vcpus += vm.instance.vcpus
        return mem, vcpus

    def list_hosts(self) -> list[ComputeHost]:
        with self._lock:
            self._advance()
            out = []
            for h in self._hosts.values():
                mem, vcpus = self._used(h.name)
                out.append(
                    ComputeHost(
                        name=h.name,
                        enabled=h.name not in self._disabled,
                        up=h.name not in self.down,
                        disabled_reason=self._disabled.get(h.name),
                        vcpus=h.vcpus,
                        vcpus_used=vcpus,
                        memory_mb=h.memory_mb,
                        free_memory_mb=h.memory_mb - mem,
                    )
                )
            return out

    def aggregate_hosts(self, name: str) -> list[str]:
        if name not in self._aggregates:
            raise NotFound(f"no host aggregate {name!r}", status=404)
        return sorted(self._aggregates[name])

    # -- VMs ------------------------------------------------------------------------

    def _instance(self, vm: _Vm) -> Instance:
        running = any(m.state is MigrationState.RUNNING for m in vm.migrations)
        i = vm.instance
        return Instance(
            uuid=i.uuid,
            name=i.name,
            host=vm.host,
            project_id=i.project_id,
            state=i.state,
            task_state="migrating" if running else None,
            flavor_name=i.flavor_name,
            vcpus=i.vcpus,
            memory_mb=i.memory_mb,
            server_groups=i.server_groups,
        )

    def list_instances(self, host: str) -> list[Instance]:
        with self._lock:
            self._host(host)
            self._advance()
            return [self._instance(vm) for vm in self._vms.values() if vm.host == host]

    def _vm(self, instance_uuid: str) -> _Vm:
        vm = self._vms.get(instance_uuid)
        if vm is None:
            raise NotFound(f"no instance {instance_uuid}")
        return vm

    def get_instance(self, instance_uuid: str) -> Instance:
        with self._lock:
            self._advance()
            return self._instance(self._vm(instance_uuid))

    # -- migrations -----------------------------------------------------------------

    def start_live_migration(
        self,
        instance_uuid: str,
        target_host: str | None = None,
        block_migration: bool | None = None,
        options: LiveMigrationOptions | None = None,
    ) -> MigrationRef:
        with self._lock:
            self._advance()
            vm = self._vm(instance_uuid)
            if target_host is None:
                raise InvalidRequest("the simulated cloud has no scheduler: name a target")
            target = self._host(target_host)
            if vm.instance.state is not InstanceState.ACTIVE:
                raise Conflict(f"{instance_uuid} is {vm.instance.state}, not active")
            if any(m.state is MigrationState.RUNNING for m in vm.migrations):
                raise Conflict(f"{instance_uuid} is migrating already")
            if vm.host == target.name:
                raise Conflict(f"{instance_uuid} runs on {target.name} already")
            if target.name in self._disabled:
                raise Conflict(f"target {target.name} is disabled")
            mem, vcpus = self._used(target.name)
            if (
                mem + vm.instance.memory_mb > target.memory_mb
                or vcpus + vm.instance.vcpus > target.vcpus
            ):
                raise Conflict(f"target {target.name} has no room for {instance_uuid}")
            ref = MigrationRef(
                instance_uuid, self._next_id, MigrationKind.LIVE, f"sim-{self._next_id}"
            )
            self._next_id += 1
            vm.migrations.append(
                _Migration(
                    ref,
                    vm.host,
                    target.name,
                    vm.instance.memory_mb * MIB,
                    self._clock(),
                    self._duration_s(vm, options or LiveMigrationOptions()),
                )
            )
            self.migrations_started += 1
            self._starts.append(
                Start(instance_uuid, target.name, options or LiveMigrationOptions())
            )
            return ref

    def _migration(self, ref: MigrationRef) -> tuple[_Vm, _Migration]:
        vm = self._vm(ref.instance_uuid)
        for m in vm.migrations:
            if m.ref.migration_id == ref.migration_id:
                return vm, m
        raise NotFound(f"no migration {ref.migration_id} of {ref.instance_uuid}")

    def latest_migration(self, instance_uuid: str) -> MigrationRef | None:
        with self._lock:
            vm = self._vm(instance_uuid)
            return vm.migrations[-1].ref if vm.migrations else None

    def get_migration(self, ref: MigrationRef) -> MigrationStatus:
        with self._lock:
            self._advance()
            _, m = self._migration(ref)
            if m.state is MigrationState.RUNNING:
                done = min(1.0, (self._clock() - m.started_s) / max(m.duration_s, 1e-9))
            else:
                done = 1.0 if m.state is MigrationState.COMPLETED else 0.0
            processed = int(m.memory_bytes * done)
            return MigrationStatus(
                ref=m.ref,
                state=m.state,
                cloud_status=str(m.state),
                source_host=m.source,
                dest_host=m.target,
                memory_total_bytes=m.memory_bytes,
                memory_processed_bytes=processed,
                memory_remaining_bytes=m.memory_bytes - processed,
            )

    def force_complete(self, ref: MigrationRef) -> None:
        with self._lock:
            self._advance()
            vm, m = self._migration(ref)
            if m.state is not MigrationState.RUNNING:
                raise Conflict(f"migration {ref.migration_id} is {m.state}")
            if ref.instance_uuid in self._cuts:
                # the switch happens, then the link breaks: a broken post-copy
                cut = self._cuts[ref.instance_uuid]
                m.postcopy = True
                m.paused_until = float("inf") if cut is None else self._clock() + cut
                return
            self._complete(vm, m, self._clock())

    def postcopy_phase(self, ref: MigrationRef) -> str:
        """'paused' (a broken post-copy), 'postcopy', or '' (pre-copy, or ended)."""
        with self._lock:
            self._advance()
            _, m = self._migration(ref)
            if m.state is not MigrationState.RUNNING:
                return ""
            if m.paused_until is not None:
                return "paused"
            return "postcopy" if m.postcopy else ""

    def resume_postcopy(self, ref: MigrationRef, migration_uri: str = "") -> None:
        with self._lock:
            self._advance()
            _, m = self._migration(ref)
            now = self._clock()
            if m.state is not MigrationState.RUNNING or m.paused_until is None:
                raise Conflict(f"migration {ref.migration_id} has no broken post-copy")
            taken = now >= m.paused_until and ref.instance_uuid not in self._target_lost
            self.resume_tries.append((ref.instance_uuid, now, taken))
            if not taken:
                raise Unavailable(f"resume {ref.instance_uuid}: unable to connect to {m.target}")
            m.paused_until = None
            m.duration_s = now - m.started_s + self.resume_tail_s

    def postcopy_target(self, ref: MigrationRef) -> TargetHalf:
        with self._lock:
            _, m = self._migration(ref)
            if ref.instance_uuid in self._target_lost:
                return TargetHalf.GONE
            if m.paused_until is not None and self._clock() < m.paused_until:
                return TargetHalf.UNREACHABLE
            return TargetHalf.PRESENT

    def complete(self, instance_uuid: str) -> None:
        """Ends the VM's running migration now, as a pre-copy that converged."""
        with self._lock:
            self._advance()
            vm = self._vm(instance_uuid)
            running = [m for m in vm.migrations if m.state is MigrationState.RUNNING]
            if not running:
                raise Conflict(f"{instance_uuid} is not migrating")
            self._complete(vm, running[-1], self._clock())

    def abort(self, ref: MigrationRef) -> None:
        with self._lock:
            self._advance()
            _, m = self._migration(ref)
            if m.state is not MigrationState.RUNNING:
                raise Conflict(f"migration {ref.migration_id} is {m.state}")
            if m.postcopy:
                self.aborts_in_postcopy.append(ref.instance_uuid)
                raise Conflict(f"migration {ref.migration_id} is in post-copy: no abort")
            m.state = MigrationState.CANCELLED
            m.ended_s = self._clock()
            if self._error_after_abort:
                self._errors_due[ref.instance_uuid] = self._clock() + self._error_delay_s

    def reset_to_active(self, instance_uuid: str) -> None:
        with self._lock:
            self._advance()
            vm = self._vm(instance_uuid)
            vm.instance = dataclasses.replace(vm.instance, state=InstanceState.ACTIVE)
            self.resets.append(instance_uuid)

    def cold_migrate(self, instance_uuid: str, target_host: str | None = None) -> MigrationRef:
        raise InvalidRequest("the simulated cloud has no cold migration")

    def confirm_migration(self, ref: MigrationRef) -> None:
        raise InvalidRequest("the simulated cloud has no cold migration to confirm")

    # -- what the checks read -------------------------------------------------------

    def placement(self) -> dict[str, str]:
        """Where each VM runs now."""
        with self._lock:
            self._advance()
            return {u: vm.host for u, vm in self._vms.items()}

    def starts(self) -> list[Start]:
        """Every migration started, in the order the driver was asked."""
        with self._lock:
            return list(self._starts)

    def moves(self) -> list[Move]:
        """Every completed migration, in the order the driver saw them end."""
        with self._lock:
            self._advance()
            return list(self._moves)
