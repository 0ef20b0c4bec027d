"""The `nova` migration driver: drains a host through the Nova compute API.

It talks to Nova through an openstacksdk connection's compute adapter with an
explicit microversion on every request, rather than through the SDK's
resource proxies: those pick their own microversion per resource (live
migration at 2.30, hypervisors at 2.88 which hides free memory, migrations
capped at 2.80), and the driver's behaviour must not change with the SDK's
release. The microversion is the lower of the one asked for and the server's
maximum, and must reach a floor (2.30 by default: from there a chosen target
host still goes through the scheduler's checks).

Errors: 400 -> InvalidRequest, 401/403 -> Forbidden, 404 -> NotFound,
409 -> Conflict (with Nova's message), 5xx, transport errors and timeouts ->
NovaUnavailable. Only GETs are retried (bounded, with exponential backoff);
an action that got no usable answer raises NovaUnavailable with
`may_have_acted=True`, and the caller re-checks state (`latest_migration`,
`host_enabled`) instead of sending it again.
"""

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode

import openstack
import openstack.connection
from keystoneauth1 import exceptions as ksa_exceptions
from keystoneauth1 import noauth
from keystoneauth1 import session as ksa_session

from hostmaint.coordinator.drivers.base import (
    ComputeHost,
    Conflict,
    DriverError,
    Forbidden,
    Instance,
    InstanceState,
    InvalidRequest,
    LiveMigrationOptions,
    MigrationDriver,
    MigrationKind,
    MigrationRef,
    MigrationState,
    MigrationStatus,
    NotFound,
    ServerGroup,
    TargetHalf,
    Unavailable,
)

LOG = logging.getLogger(__name__)

COMPUTE_BINARY = "nova-compute"
# Hypervisor details lose their resource figures at 2.88.
HYPERVISOR_MAX_MICROVERSION = (2, 87)

_VM_STATES = {
    "active": InstanceState.ACTIVE,
    "paused": InstanceState.PAUSED,
    "stopped": InstanceState.SHUTOFF,
    "suspended": InstanceState.SUSPENDED,
    "error": InstanceState.ERROR,
}
_STATUS_STATES = {
    "ACTIVE": InstanceState.ACTIVE,
    "PAUSED": InstanceState.PAUSED,
    "SHUTOFF": InstanceState.SHUTOFF,
    "SUSPENDED": InstanceState.SUSPENDED,
}
_MIGRATION_STATES = {
    "accepted": MigrationState.QUEUED,
    "queued": MigrationState.QUEUED,
    "pre-migrating": MigrationState.QUEUED,
    "preparing": MigrationState.PREPARING,
    "running": MigrationState.RUNNING,
    "running (post-copy)": MigrationState.RUNNING,  # Nova's monitor, after the switch
    "migrating": MigrationState.RUNNING,
    "post-migrating": MigrationState.RUNNING,
    "confirming": MigrationState.RUNNING,
    "reverting": MigrationState.RUNNING,
    "finished": MigrationState.AWAITING_CONFIRM,
    "completed": MigrationState.COMPLETED,
    "confirmed": MigrationState.COMPLETED,
    "done": MigrationState.COMPLETED,
    "cancelled": MigrationState.CANCELLED,
    "reverted": MigrationState.CANCELLED,
    "failed": MigrationState.FAILED,
    "error": MigrationState.ERROR,
}
_MIGRATION_KINDS = {"live-migration": MigrationKind.LIVE, "migration": MigrationKind.COLD}


class NovaUnavailable(Unavailable):
    """Nova did not answer usably: transport error, timeout or 5xx."""


Microversion = tuple[int, int]


def parse_microversion(text: str) -> Microversion:
    major, _, minor = text.partition(".")
    try:
        return int(major), int(minor)
    except ValueError:
        raise ValueError(f"not a microversion: {text!r}") from None


def _format(mv: Microversion) -> str:
    return f"{mv[0]}.{mv[1]}"


def connect(
    *,
    cloud: str | None = None,
    endpoint: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
) -> openstack.connection.Connection:
    """An openstacksdk connection: a clouds.yaml cloud, or an endpoint with headers.

    The endpoint form (no Keystone) suits a Nova whose auth is stubbed, as
    in the tests, where `headers` carry the identity (X-Auth-User, X-Roles).
    """
    if cloud is not None:
        return openstack.connect(cloud=cloud, api_timeout=timeout_s)
    if endpoint is None:
        raise ValueError("connect needs a cloud name or an endpoint")
    session = ksa_session.Session(
        auth=noauth.NoAuth(endpoint=endpoint),
        additional_headers=dict(headers or {}),
        timeout=timeout_s,
    )
    return openstack.connection.Connection(session=session, compute_endpoint_override=endpoint)


def _message(body: bytes) -> str:
    """Nova's error message: {"conflictingRequest": {"message": ...}} or text."""
    try:
        data = json.loads(body)
    except ValueError:
        text = body.decode(errors="replace")
        return " ".join(text.split())[:300]
    if isinstance(data, dict):
        for value in data.values():
            if isinstance(value, dict) and "message" in value:
                return str(value["message"])
    return str(data)[:300]


def _client_error(status: int, message: str, method: str, path: str) -> DriverError:
    kind: type[DriverError]
    if status == 400:
        kind = InvalidRequest
    elif status in (401, 403):
        kind = Forbidden
    elif status == 404:
        kind = NotFound
    elif status == 409:
        kind = Conflict
    else:
        kind = InvalidRequest
    return kind(message, method=method, path=path, status=status)


class NovaDriver:
    """MigrationDriver over the Nova compute API."""

    can_cold_migrate = True  # Nova's migrate and confirm-resize
    # Nova 34.0.0 marks the server failed about a second after an aborted live migration's
    # record ends (its migration thread's error surfaces after the rollback).
    error_settle_s = 15.0
    # Nova 34 rolls a live migration whose libvirt call failed back at once, post-copy or
    # not: its rollback at the destination destroys the guest there, the only copy of its
    # state since the switch (docs/nova.md). A resume behind its back would race that and
    # leave Nova's record on the source: a broken post-copy is reported, not resumed.
    can_resume_postcopy = False

    def __init__(
        self,
        conn: openstack.connection.Connection,
        *,
        microversion: str = "2.80",
        min_microversion: str = "2.30",
        timeout_s: float = 30.0,
        get_retries: int = 3,
        backoff_s: float = 0.5,
        backoff_max_s: float = 5.0,
        deadline_s: float | None = None,
        lookup_timeout_s: float = 30.0,
        poll_interval_s: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[float], bool] | None = None,
    ) -> None:
        """`deadline_s` bounds one driver call, retries included (None: no bound).

        `wait(seconds)` sleeps between retries and returns True to stop at
        once (an Event's wait); `lookup_timeout_s` bounds the search for the
        migration record an action has just created.
        """
        self._conn = conn
        self._wanted = parse_microversion(microversion)
        self._floor = parse_microversion(min_microversion)
        if self._wanted < self._floor:
            raise ValueError(f"microversion {microversion} is below the floor {min_microversion}")
        self._timeout_s = timeout_s
        self._get_retries = get_retries
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s
        self._deadline_s = deadline_s
        self._lookup_timeout_s = lookup_timeout_s
        self._poll_interval_s = poll_interval_s
        self._clock = clock
        self._wait = wait if wait is not None else threading.Event().wait
        self._mv: Microversion | None = None
        self._mv_lock = threading.Lock()

    # -- transport -------------------------------------------------------

    def microversion(self) -> str:
        """The microversion in use, agreed with the server on first use."""
        return _format(self._microversion())

    def _microversion(self) -> Microversion:
        with self._mv_lock:
            if self._mv is not None:
                return self._mv
            try:
                data = self._conn.compute.get_endpoint_data()
            except ksa_exceptions.ClientException as exc:
                raise NovaUnavailable(f"version discovery failed: {exc}") from exc
            server_max = tuple(data.max_microversion or (2, 1))
            chosen = min(self._wanted, (int(server_max[0]), int(server_max[1])))
            if chosen < self._floor:
                raise InvalidRequest(
                    f"Nova supports microversions up to {_format(chosen)}, "
                    f"below the floor {_format(self._floor)}"
                )
            LOG.info("nova microversion=%s server_max=%s", _format(chosen), server_max)
            self._mv = chosen
            return chosen

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        microversion: Microversion | None = None,
    ) -> Any:
        """One API call; returns the decoded JSON body (None when empty)."""
        mv = microversion or self._microversion()
        url = path + ("?" + urlencode(query) if query else "")
        idempotent = method == "GET"
        allowed = 1 + (self._get_retries if idempotent else 0)
        started = self._clock()
        attempt = 0
        while True:
            attempt += 1
            timeout_s = self._timeout_s
            if self._deadline_s is not None:
                timeout_s = max(0.001, min(timeout_s, self._deadline_s - (self._clock() - started)))
            status: int | None = None
            try:
                resp = self._conn.compute.request(
                    url,
                    method,
                    json=body,
                    microversion=_format(mv),
                    raise_exc=False,
                    timeout=timeout_s,
                )
            except ksa_exceptions.ConnectionError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            else:
                status = resp.status_code
                if status < 400:
                    return resp.json() if resp.content else None
                message = _message(resp.content)
                if status < 500:
                    raise _client_error(status, message, method, url)
                reason = message
            elapsed_s = self._clock() - started
            failure = NovaUnavailable(
                reason,
                method=method,
                path=url,
                status=status,
                attempts=attempt,
                elapsed_s=elapsed_s,
                may_have_acted=not idempotent,
            )
            delay_s = min(self._backoff_max_s, self._backoff_s * 2 ** (attempt - 1))
            over_deadline = self._deadline_s is not None and elapsed_s + delay_s >= self._deadline_s
            if attempt >= allowed or over_deadline:
                LOG.warning(
                    "nova unavailable method=%s path=%s status=%s attempts=%d: %s",
                    method,
                    url,
                    status,
                    attempt,
                    reason,
                )
                raise failure
            LOG.info(
                "nova retry method=%s path=%s status=%s attempt=%d delay_s=%.2f",
                method,
                url,
                status,
                attempt,
                delay_s,
            )
            if self._wait(delay_s):
                raise failure

    # -- hosts ------------------------------------------------------------

    def _service(self, host: str) -> dict[str, Any]:
        data = self._request("GET", "/os-services", query={"binary": COMPUTE_BINARY, "host": host})
        services = [s for s in data["services"] if s["host"] == host]
        if not services:
            raise NotFound(f"no {COMPUTE_BINARY} service on host {host}", status=404)
        service: dict[str, Any] = services[0]
        return service

    def disable_host(self, host: str, reason: str) -> None:
        mv = self._microversion()
        if mv >= (2, 53):
            service = self._service(host)
            self._request(
                "PUT",
                f"/os-services/{service['id']}",
                body={"status": "disabled", "disabled_reason": reason},
            )
        else:
            self._request(
                "PUT",
                "/os-services/disable-log-reason",
                body={"host": host, "binary": COMPUTE_BINARY, "disabled_reason": reason},
            )
        LOG.info("host disabled host=%s reason=%s", host, reason)

    def enable_host(self, host: str) -> None:
        mv = self._microversion()
        if mv >= (2, 53):
            service = self._service(host)
            self._request("PUT", f"/os-services/{service['id']}", body={"status": "enabled"})
        else:
            self._request(
                "PUT", "/os-services/enable", body={"host": host, "binary": COMPUTE_BINARY}
            )
        LOG.info("host enabled host=%s", host)

    def host_enabled(self, host: str) -> bool:
        return bool(self._service(host)["status"] == "enabled")

    def host_disabled_reason(self, host: str) -> str | None:
        reason = self._service(host).get("disabled_reason")
        return str(reason) if reason is not None else None

    def list_hosts(self) -> list[ComputeHost]:
        services = self._request("GET", "/os-services", query={"binary": COMPUTE_BINARY})
        hv_mv = min(self._microversion(), HYPERVISOR_MAX_MICROVERSION)
        hypervisors = self._request("GET", "/os-hypervisors/detail", microversion=hv_mv)
        by_host: dict[str, dict[str, Any]] = {}
        for hv in hypervisors.get("hypervisors", []):
            service_host = (hv.get("service") or {}).get("host")
            if service_host is not None:
                by_host[service_host] = hv
        hosts = []
        for service in services["services"]:
            hv = by_host.get(service["host"], {})
            free = hv.get("free_ram_mb")
            hosts.append(
                ComputeHost(
                    name=service["host"],
                    enabled=service["status"] == "enabled",
                    up=service["state"] == "up",
                    disabled_reason=service.get("disabled_reason"),
                    vcpus=hv.get("vcpus"),
                    vcpus_used=hv.get("vcpus_used"),
                    memory_mb=hv.get("memory_mb"),
                    free_memory_mb=int(free) if free is not None else None,
                )
            )
        return hosts

    def aggregate_hosts(self, name: str) -> list[str]:
        """The hosts of a host aggregate (os-aggregates), by its name."""
        for aggregate in self._request("GET", "/os-aggregates").get("aggregates", []):
            if aggregate.get("name") == name:
                return sorted(aggregate.get("hosts") or [])
        raise NotFound(
            f"no host aggregate {name!r}", method="GET", path="/os-aggregates", status=404
        )

    # -- instances --------------------------------------------------------

    def list_instances(self, host: str) -> list[Instance]:
        servers = self._all_servers(host)
        groups = self._server_groups()
        return [self._instance(server, groups.get(server["id"], ())) for server in servers]

    def get_instance(self, instance_uuid: str) -> Instance:
        server = self._request("GET", f"/servers/{instance_uuid}")["server"]
        groups = self._server_groups()
        return self._instance(server, groups.get(instance_uuid, ()))

    def _all_servers(self, host: str) -> list[dict[str, Any]]:
        servers: list[dict[str, Any]] = []
        query = {"host": host, "all_tenants": "1", "limit": "200"}
        while True:
            page = self._request("GET", "/servers/detail", query=query)["servers"]
            servers.extend(page)
            if len(page) < int(query["limit"]):
                return servers
            query = {**query, "marker": page[-1]["id"]}

    def _server_groups(self) -> dict[str, tuple[ServerGroup, ...]]:
        data = self._request("GET", "/os-server-groups", query={"all_projects": "True"})
        members: dict[str, list[ServerGroup]] = {}
        for group in data.get("server_groups", []):
            policy = group.get("policy") or ",".join(group.get("policies") or [])
            value = ServerGroup(id=group["id"], name=group.get("name", ""), policy=policy)
            for member in group.get("members", []):
                members.setdefault(member, []).append(value)
        return {uuid: tuple(groups) for uuid, groups in members.items()}

    def _instance(self, server: dict[str, Any], groups: tuple[ServerGroup, ...]) -> Instance:
        flavor = server.get("flavor") or {}
        if "original_name" not in flavor and "id" in flavor:
            flavor = self._flavor(str(flavor["id"]))
        vm_state = server.get("OS-EXT-STS:vm_state")
        state = _VM_STATES.get(vm_state or "") or _STATUS_STATES.get(
            server.get("status", ""), InstanceState.OTHER
        )
        return Instance(
            uuid=server["id"],
            name=server.get("name", ""),
            host=server.get("OS-EXT-SRV-ATTR:host"),
            project_id=server.get("tenant_id", ""),
            state=state,
            task_state=server.get("OS-EXT-STS:task_state"),
            flavor_name=flavor.get("original_name") or flavor.get("name", ""),
            vcpus=int(flavor.get("vcpus", 0)),
            memory_mb=int(flavor.get("ram", 0)),
            server_groups=groups,
        )

    def _flavor(self, flavor_id: str) -> dict[str, Any]:
        flavor: dict[str, Any] = self._request("GET", f"/flavors/{flavor_id}")["flavor"]
        return flavor

    # -- migrations -------------------------------------------------------

    def _migrations(self, instance_uuid: str) -> list[dict[str, Any]]:
        data = self._request("GET", "/os-migrations", query={"instance_uuid": instance_uuid})
        # Another server's records never match, whatever the filter did.
        return [m for m in data["migrations"] if m.get("instance_uuid") == instance_uuid]

    @staticmethod
    def _ref(record: dict[str, Any]) -> MigrationRef:
        return MigrationRef(
            instance_uuid=record["instance_uuid"],
            migration_id=int(record["id"]),
            kind=_MIGRATION_KINDS.get(record.get("migration_type", ""), MigrationKind.COLD),
            migration_uuid=record.get("uuid"),
        )

    def latest_migration(self, instance_uuid: str) -> MigrationRef | None:
        records = self._migrations(instance_uuid)
        if not records:
            return None
        return self._ref(max(records, key=lambda m: int(m["id"])))

    def _newest_id(self, instance_uuid: str) -> int:
        ref = self.latest_migration(instance_uuid)
        return ref.migration_id if ref is not None else 0

    def _find_new(self, instance_uuid: str, after_id: int, kind: MigrationKind) -> MigrationRef:
        """The record an accepted action created: Nova creates it asynchronously.

        The action was accepted, so a failure here says it may have acted.
        """
        try:
            return self._poll_new(instance_uuid, after_id, kind)
        except Unavailable as exc:
            exc.may_have_acted = True
            raise

    def _poll_new(self, instance_uuid: str, after_id: int, kind: MigrationKind) -> MigrationRef:
        started = self._clock()
        while True:
            for record in self._migrations(instance_uuid):
                ref = self._ref(record)
                if ref.migration_id > after_id and ref.kind is kind:
                    return ref
            if self._clock() - started >= self._lookup_timeout_s:
                raise NovaUnavailable(
                    f"no {kind} migration record for {instance_uuid} "
                    f"after {self._lookup_timeout_s} s",
                    method="GET",
                    path="/os-migrations",
                    may_have_acted=True,
                )
            if self._wait(self._poll_interval_s):
                raise NovaUnavailable("stopped while looking for the migration record")

    def start_live_migration(
        self,
        instance_uuid: str,
        target_host: str | None = None,
        block_migration: bool | None = None,
        options: LiveMigrationOptions | None = None,
    ) -> MigrationRef:
        """Nova starts the job with what nova.conf permits: `options` are not Nova's to take.

        The agents apply the downtime limit and the other tuning to Nova's job.
        """
        mv = self._microversion()
        after_id = self._newest_id(instance_uuid)
        action: dict[str, Any] = {
            "host": target_host,
            "block_migration": "auto" if block_migration is None else block_migration,
        }
        if target_host is not None and mv < (2, 68):
            # The scheduler still checks the target (from 2.68 it always does).
            action["force"] = False
        self._request("POST", f"/servers/{instance_uuid}/action", body={"os-migrateLive": action})
        ref = self._find_new(instance_uuid, after_id, MigrationKind.LIVE)
        LOG.info(
            "live migration started vm=%s migration=%d target=%s",
            instance_uuid,
            ref.migration_id,
            target_host or "scheduler",
        )
        return ref

    def get_migration(self, ref: MigrationRef) -> MigrationStatus:
        if ref.kind is MigrationKind.LIVE:
            # In-progress live migrations carry their memory counters here;
            # a finished one answers 404 and is read from /os-migrations.
            try:
                data = self._request(
                    "GET", f"/servers/{ref.instance_uuid}/migrations/{ref.migration_id}"
                )
                return self._status(ref, data["migration"])
            except NotFound:
                pass
        for record in self._migrations(ref.instance_uuid):
            if int(record["id"]) == ref.migration_id:
                return self._status(ref, record)
        raise NotFound(
            f"no migration {ref.migration_id} for {ref.instance_uuid}",
            method="GET",
            path="/os-migrations",
            status=404,
        )

    @staticmethod
    def _status(ref: MigrationRef, record: dict[str, Any]) -> MigrationStatus:
        cloud_status = str(record.get("status", ""))
        return MigrationStatus(
            ref=ref,
            state=_MIGRATION_STATES.get(cloud_status, MigrationState.UNKNOWN),
            cloud_status=cloud_status,
            source_host=record.get("source_compute"),
            dest_host=record.get("dest_compute"),
            memory_total_bytes=record.get("memory_total_bytes"),
            memory_processed_bytes=record.get("memory_processed_bytes"),
            memory_remaining_bytes=record.get("memory_remaining_bytes"),
            disk_total_bytes=record.get("disk_total_bytes"),
            disk_processed_bytes=record.get("disk_processed_bytes"),
            disk_remaining_bytes=record.get("disk_remaining_bytes"),
        )

    def force_complete(self, ref: MigrationRef) -> None:
        self._request(
            "POST",
            f"/servers/{ref.instance_uuid}/migrations/{ref.migration_id}/action",
            body={"force_complete": None},
        )
        LOG.info("live migration force-complete vm=%s migration=%d", *_ids(ref))

    def abort(self, ref: MigrationRef) -> None:
        self._request("DELETE", f"/servers/{ref.instance_uuid}/migrations/{ref.migration_id}")
        LOG.info("live migration abort vm=%s migration=%d", *_ids(ref))

    def resume_postcopy(self, ref: MigrationRef, migration_uri: str = "") -> None:
        raise InvalidRequest(
            f"{ref.instance_uuid}: Nova has no call to resume a broken post-copy, and its "
            "rollback destroys the guest's copy on the destination"
        )

    def postcopy_target(self, ref: MigrationRef) -> TargetHalf:
        return TargetHalf.UNREACHABLE  # Nova does not say; its agents do (not asked here)

    def reset_to_active(self, instance_uuid: str) -> None:
        self._request(
            "POST",
            f"/servers/{instance_uuid}/action",
            body={"os-resetState": {"state": "active"}},
        )
        LOG.warning("server reset from error to active vm=%s", instance_uuid)

    def cold_migrate(self, instance_uuid: str, target_host: str | None = None) -> MigrationRef:
        mv = self._microversion()
        if target_host is not None and mv < (2, 56):
            raise InvalidRequest(
                f"a cold migration target needs microversion 2.56, have {_format(mv)}"
            )
        after_id = self._newest_id(instance_uuid)
        action = {"host": target_host} if target_host is not None else None
        self._request("POST", f"/servers/{instance_uuid}/action", body={"migrate": action})
        ref = self._find_new(instance_uuid, after_id, MigrationKind.COLD)
        LOG.info(
            "cold migration started vm=%s migration=%d target=%s",
            instance_uuid,
            ref.migration_id,
            target_host or "scheduler",
        )
        return ref

    def confirm_migration(self, ref: MigrationRef) -> None:
        self._request("POST", f"/servers/{ref.instance_uuid}/action", body={"confirmResize": None})
        LOG.info("cold migration confirmed vm=%s migration=%d", *_ids(ref))


def _ids(ref: MigrationRef) -> tuple[str, int]:
    return ref.instance_uuid, ref.migration_id


def _conforms(driver: NovaDriver) -> MigrationDriver:
    """A static check that NovaDriver implements the MigrationDriver protocol."""
    return driver
