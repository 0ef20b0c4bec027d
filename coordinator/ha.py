"""Several coordinators over one journal: one leads, the others stand by.

Leadership and the per-host drain locks are leases in a coordination service
(tooz; tested with etcd through its etcd3gw driver): `ha_tooz.ToozCoordination`,
loaded only when `[coordination] backend_url` is set, since tooz and etcd3gw
come with the package's `ha` extra. A coordinator that dies stops
heartbeating; its leases expire after `lease_ttl_s` and a standby takes over,
then resumes the drains from the journal.

`SingleProcess` is the default: no service, this process always leads and
host locks are only in memory (the journal's host_locks row still guards a
host against a second drain).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from typing import Protocol

from hostmaint.common import extras

OPTION = "[coordination] backend_url"
# tooz's drivers for these schemes talk to etcd through etcd3gw.
ETCD3GW_SCHEMES = ("etcd3+http", "etcd3+https")

LEADER = "leader"


def host_lock_name(host: str) -> str:
    return f"host/{host}"


def default_member_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Coordination(Protocol):
    """What the executor sees of the coordination between coordinators."""

    @property
    def member_id(self) -> str: ...

    def start(self) -> None:
        """Joins the group and starts heartbeating and campaigning for leadership."""

    def stop(self) -> None:
        """Releases leadership and host locks and leaves the group."""

    def is_leader(self) -> bool:
        """True while this coordinator holds the leadership lease."""

    def lock_host(self, host: str) -> bool:
        """Takes the host's drain lock if free; False when another coordinator holds it."""

    def unlock_host(self, host: str) -> None: ...

    def holds_host(self, host: str) -> bool: ...

    def members(self) -> frozenset[str]:
        """The coordinators in the group (this one included)."""


class SingleProcess:
    """The one coordinator process: always the leader, host locks in memory."""

    def __init__(self, on_elected: Callable[[], None] | None = None) -> None:
        self._on_elected = on_elected
        self._hosts: set[str] = set()
        self._mutex = threading.Lock()
        self._started = False

    @property
    def member_id(self) -> str:
        return default_member_id()

    def start(self) -> None:
        self._started = True
        if self._on_elected is not None:
            self._on_elected()

    def stop(self) -> None:
        self._started = False
        with self._mutex:
            self._hosts.clear()

    def is_leader(self) -> bool:
        return self._started

    def lock_host(self, host: str) -> bool:
        with self._mutex:
            if host in self._hosts:
                return False
            self._hosts.add(host)
            return True

    def unlock_host(self, host: str) -> None:
        with self._mutex:
            self._hosts.discard(host)

    def holds_host(self, host: str) -> bool:
        with self._mutex:
            return host in self._hosts

    def members(self) -> frozenset[str]:
        return frozenset({self.member_id}) if self._started else frozenset()


def from_config(
    backend_url: str,
    group: str,
    member_id: str,
    lease_ttl_s: int,
    heartbeat_interval_s: float,
    on_elected: Callable[[], None] | None = None,
    on_lost: Callable[[str], None] | None = None,
) -> Coordination:
    """The [coordination] options' implementation: SingleProcess when backend_url is empty.

    With a backend_url, MissingExtra when the `ha` extra it needs is not
    installed; nothing is connected before `start()`.
    """
    if not backend_url:
        return SingleProcess(on_elected=on_elected)
    modules = ["tooz"]
    if backend_url.split("://", 1)[0] in ETCD3GW_SCHEMES:
        modules.append("etcd3gw")
    extras.require(extras.HA, OPTION, modules)
    from hostmaint.coordinator.ha_tooz import ToozCoordination

    return ToozCoordination(
        backend_url,
        group,
        member_id,
        lease_ttl_s=lease_ttl_s,
        heartbeat_interval_s=heartbeat_interval_s,
        on_elected=on_elected,
        on_lost=on_lost,
    )
