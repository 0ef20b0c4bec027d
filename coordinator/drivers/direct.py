"""The `libvirt` migration driver: no cloud API, the agents move the VMs themselves.

For clouds without Nova and for the local lab. The source host's agent
migrates each domain peer to peer to the target host's libvirt URI; a host is
"disabled" in the coordinator's own journal, and the coordinator's planner is
what honours it. Where a VM is, and how its migration went, is asked of the
agents, so nothing here is lost when the coordinator restarts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from hostmaint.coordinator import errors
from hostmaint.coordinator.agents import AgentClient, AgentRegistry, Health
from hostmaint.coordinator.drivers.base import (
    ComputeHost,
    Conflict,
    DriverError,
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
from hostmaint.coordinator.journal import Journal
from hostmaint.protos import agent_pb2 as apb

LOG = logging.getLogger(__name__)
MIB = 1024 * 1024
_STATES = {
    apb.DOMAIN_STATE_RUNNING: InstanceState.ACTIVE,
    apb.DOMAIN_STATE_BLOCKED: InstanceState.ACTIVE,
    apb.DOMAIN_STATE_PAUSED: InstanceState.PAUSED,
    apb.DOMAIN_STATE_SHUTOFF: InstanceState.SHUTOFF,
    apb.DOMAIN_STATE_SHUTDOWN: InstanceState.SHUTOFF,
    apb.DOMAIN_STATE_PMSUSPENDED: InstanceState.SUSPENDED,
}


def _driver_error(e: errors.CoordinatorError, what: str) -> DriverError:
    if isinstance(e, errors.AgentUnavailable):
        return Unavailable(f"{what}: {e}")
    if isinstance(e, errors.AgentRefused):
        if e.code == "NOT_FOUND":
            return NotFound(f"{what}: {e.detail}")
        if e.code == "INVALID_ARGUMENT":
            return InvalidRequest(f"{what}: {e.detail}")
        return Conflict(f"{what}: {e.detail}")
    if isinstance(e, errors.UnknownHost):
        return NotFound(str(e))
    return DriverError(f"{what}: {e}")


class DirectDriver:
    """MigrationDriver over the hosts' agents and libvirt, without a cloud."""

    # no image service to carry a stopped VM's disks
    can_cold_migrate = False
    # the source agent started the migration: it resumes it with the same flags
    can_resume_postcopy = True
    error_settle_s = 0.0  # libvirt keeps no VM state of its own

    def __init__(
        self,
        registry: AgentRegistry,
        journal: Journal,
        uris: Mapping[str, str],
        *,
        clock: Callable[[], float],
        cpu_allocation_ratio: float = 16.0,
    ) -> None:
        self._cpu_allocation_ratio = cpu_allocation_ratio
        self._registry = registry
        self._journal = journal
        self._uris = dict(uris)
        self._clock = clock

    def _agent(self, host: str) -> AgentClient:
        try:
            return self._registry.client(host)
        except errors.UnknownHost as e:
            raise NotFound(str(e)) from e

    def _known(self, host: str) -> None:
        if host not in self._registry.hosts():
            raise NotFound(f"unknown compute host {host!r}")

    # -- hosts ----------------------------------------------------------------------

    def disable_host(self, host: str, reason: str) -> None:
        self._known(host)
        self._journal.disable_host(host, reason)

    def enable_host(self, host: str) -> None:
        self._known(host)
        self._journal.enable_host(host)

    def host_enabled(self, host: str) -> bool:
        self._known(host)
        return self._journal.disabled_reason(host) is None

    def list_hosts(self) -> list[ComputeHost]:
        hosts = []
        for name in self._registry.hosts():
            status = self._registry.probe(name)
            report = status.report
            reason = self._journal.disabled_reason(name)
            used = None
            if report is not None:
                try:
                    used = sum(
                        d.vcpus
                        for d in self._agent(name).list_domains()
                        if d.state == apb.DOMAIN_STATE_RUNNING
                    )
                except errors.CoordinatorError:
                    used = None
            hosts.append(
                ComputeHost(
                    name=name,
                    enabled=reason is None,
                    up=status.health == Health.SERVING,
                    disabled_reason=reason,
                    vcpus=int(report.cpu_count * self._cpu_allocation_ratio) if report else None,
                    vcpus_used=used,
                    memory_mb=report.memory_total_bytes // MIB if report is not None else None,
                    # 0: the hypervisor does not say.
                    free_memory_mb=(report.memory_free_bytes // MIB or None) if report else None,
                )
            )
        return hosts

    # -- VMs ------------------------------------------------------------------------

    def _instance(self, host: str, d: apb.Domain) -> Instance:
        return Instance(
            uuid=d.uuid,
            name=d.nova.name or d.name,
            host=host,
            project_id=d.nova.project_uuid,
            # either half of a broken post-copy is no running VM (the target's runs only
            # until it touches a page left on the source)
            state=InstanceState.PAUSED
            if d.postcopy_failed
            else _STATES.get(d.state, InstanceState.OTHER),
            task_state="migrating" if d.migrating or d.postcopy_failed else None,
            flavor_name=d.nova.flavor_name,
            vcpus=d.vcpus,
            memory_mb=d.memory_max_bytes // MIB,
        )

    def list_instances(self, host: str) -> list[Instance]:
        try:
            domains = self._agent(host).list_domains()
        except errors.CoordinatorError as e:
            raise _driver_error(e, f"list the domains of {host}") from e
        return [self._instance(host, d) for d in domains]

    def get_instance(self, instance_uuid: str) -> Instance:
        """Where the VM runs now: the host whose agent has it running (or defined)."""
        found: list[Instance] = []
        for host in self._registry.hosts():
            try:
                domains = self._agent(host).list_domains([instance_uuid])
            except errors.AgentRefused:
                continue  # NOT_FOUND: not on that host
            except errors.CoordinatorError as e:
                LOG.warning("cannot ask host=%s about vm=%s error=%s", host, instance_uuid, e)
                continue
            found.extend(self._instance(host, d) for d in domains)
        if not found:
            raise NotFound(f"no host has domain {instance_uuid}")
        found.sort(key=lambda i: i.state is not InstanceState.ACTIVE)
        return found[0]

    # -- migrations -----------------------------------------------------------------

    def start_live_migration(
        self,
        instance_uuid: str,
        target_host: str | None = None,
        block_migration: bool | None = None,
        options: LiveMigrationOptions | None = None,
    ) -> MigrationRef:
        if target_host is None:
            raise InvalidRequest("the libvirt driver needs a target host (it has no scheduler)")
        if target_host not in self._uris:
            raise InvalidRequest(f"no libvirt URI configured for target {target_host}")
        source = self.get_instance(instance_uuid).host
        assert source is not None
        if source == target_host:
            raise Conflict(f"{instance_uuid} runs on {target_host} already")
        o = options or LiveMigrationOptions()
        request = apb.MigrateRequest(
            domain_uuid=instance_uuid,
            destination_uri=self._uris[target_host],
            options=apb.MigrateOptions(
                bandwidth_bytes_per_s=o.bandwidth_bytes_per_s,
                max_downtime_ms=o.max_downtime_ms,
                auto_converge=o.auto_converge,
                allow_postcopy=o.allow_postcopy,
                migration_uri=o.migration_uri,
                copy_storage=bool(block_migration),
            ),
        )
        try:
            self._agent(source).migrate(request)
        except errors.CoordinatorError as e:
            raise _driver_error(e, f"migrate {instance_uuid} from {source}") from e
        return MigrationRef(
            instance_uuid=instance_uuid,
            migration_id=int(self._clock() * 1000),
            kind=MigrationKind.LIVE,
            migration_uuid=f"{source}>{target_host}",
        )

    def latest_migration(self, instance_uuid: str) -> MigrationRef | None:
        """The agents keep no migration records: a running job is the only trace."""
        try:
            inst = self.get_instance(instance_uuid)
        except NotFound:
            return None
        if inst.task_state != "migrating" or inst.host is None:
            return None
        return MigrationRef(instance_uuid, 0, MigrationKind.LIVE, f"{inst.host}>")

    def _hosts_of(self, ref: MigrationRef) -> tuple[str, str]:
        source, _, target = (ref.migration_uuid or ">").partition(">")
        return source, target

    def _domain(self, host: str, uuid: str) -> apb.Domain | None:
        if not host:
            return None
        try:
            domains = self._agent(host).list_domains([uuid])
        except errors.AgentRefused:
            return None
        except errors.CoordinatorError as e:
            raise _driver_error(e, f"ask {host} about {uuid}") from e
        return domains[0] if domains else None

    def get_migration(self, ref: MigrationRef) -> MigrationStatus:
        source, target = self._hosts_of(ref)
        uuid = ref.instance_uuid
        src = self._domain(source, uuid)
        if src is not None and (src.migrating or src.postcopy_failed):
            state = MigrationState.RUNNING
        else:
            where = target
            if not where:
                try:
                    where = self.get_instance(uuid).host or ""
                except NotFound:
                    where = ""
            dst = self._domain(where, uuid) if where and where != source else None
            if (
                dst is not None
                and dst.state == apb.DOMAIN_STATE_RUNNING
                and not dst.postcopy_failed  # half of a broken post-copy: not moved
                and (src is None or src.state != apb.DOMAIN_STATE_RUNNING)
            ):
                state = MigrationState.COMPLETED
                target = where
            elif src is not None and src.state == apb.DOMAIN_STATE_RUNNING:
                state = MigrationState.FAILED
            else:
                state = MigrationState.UNKNOWN
        return MigrationStatus(ref, state, str(state), source or None, target or None)

    def force_complete(self, ref: MigrationRef) -> None:
        source, _ = self._hosts_of(ref)
        self._tune(
            source, apb.TuneMigrationRequest(domain_uuid=ref.instance_uuid, start_postcopy=True)
        )

    def abort(self, ref: MigrationRef) -> None:
        source, _ = self._hosts_of(ref)
        self._tune(source, apb.TuneMigrationRequest(domain_uuid=ref.instance_uuid, abort=True))

    def resume_postcopy(self, ref: MigrationRef, migration_uri: str = "") -> None:
        source, target = self._hosts_of(ref)
        request = apb.ResumeMigrationRequest(
            domain_uuid=ref.instance_uuid,
            destination_uri=self._uris.get(target, ""),
            migration_uri=migration_uri,
        )
        try:
            self._agent(source).resume(request)
        except errors.CoordinatorError as e:
            raise _driver_error(e, f"resume the post-copy of {ref.instance_uuid}") from e

    def postcopy_target(self, ref: MigrationRef) -> TargetHalf:
        _, target = self._hosts_of(ref)
        if not target:
            return TargetHalf.UNREACHABLE  # an adopted job whose target is not known
        try:
            found = self._agent(target).list_domains([ref.instance_uuid])
        except errors.AgentRefused as e:
            return TargetHalf.GONE if e.code == "NOT_FOUND" else TargetHalf.UNREACHABLE
        except errors.CoordinatorError:
            return TargetHalf.UNREACHABLE
        # a copy that no longer runs (its QEMU died; with PERSIST_DEST libvirt may keep
        # the definition, shut off) holds nothing of the guest any more
        alive = (apb.DOMAIN_STATE_RUNNING, apb.DOMAIN_STATE_PAUSED, apb.DOMAIN_STATE_BLOCKED)
        return TargetHalf.PRESENT if any(d.state in alive for d in found) else TargetHalf.GONE

    def reset_to_active(self, instance_uuid: str) -> None:
        raise InvalidRequest(f"{instance_uuid}: libvirt keeps no error state to reset")

    def _tune(self, host: str, request: apb.TuneMigrationRequest) -> None:
        try:
            self._agent(host).tune(request)
        except errors.CoordinatorError as e:
            raise _driver_error(e, f"tune the migration of {request.domain_uuid}") from e

    def cold_migrate(self, instance_uuid: str, target_host: str | None = None) -> MigrationRef:
        raise InvalidRequest("the libvirt driver cannot cold-migrate (no image service)")

    def confirm_migration(self, ref: MigrationRef) -> None:
        raise InvalidRequest("the libvirt driver has no cold migrations to confirm")
