"""Leadership and host locks as leases in a tooz coordination service.

Loaded only when `[coordination] backend_url` is set (`ha.from_config`): tooz
and its etcd client come with the package's `ha` extra, which a plain install
lacks. Tested with etcd through tooz's etcd3gw driver.

Safety rests on time, not on the service telling us: a lease is counted as
held only until `lease_ttl_s` after the last heartbeat that was *sent* and
answered (the service measures its expiry from when it received that
heartbeat, later). Requests time out after `request_timeout_s`, so a heartbeat
that succeeds was applied before the lease could have expired. A holder that
misses its deadline (a paused process, a lost service) counts the lease as
lost, says so through `on_lost`, and must stop acting on it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from tooz import coordination
from tooz.locking import Lock

from hostmaint.coordinator.ha import LEADER, default_member_id, host_lock_name

LOG = logging.getLogger(__name__)


class ToozCoordination:
    """Leadership and host locks as leases in a tooz coordination service.

    `start()` joins `group` and starts the thread `coordination-heartbeat`,
    which every `heartbeat_interval_s` renews the leases it holds and, while
    not leading, tries to take the leadership. `on_elected()` runs on that
    thread when this coordinator becomes the leader; `on_lost(name)` when a
    held lease ("leader" or "host/<name>") is found expired or unrenewable.
    """

    def __init__(
        self,
        backend_url: str,
        group: str,
        member_id: str = "",
        *,
        lease_ttl_s: int = 10,
        heartbeat_interval_s: float = 2.0,
        on_elected: Callable[[], None] | None = None,
        on_lost: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.request_timeout_s = max(1, math.ceil(heartbeat_interval_s))
        if 2 * heartbeat_interval_s + self.request_timeout_s > lease_ttl_s:
            raise ValueError(
                f"lease_ttl_s={lease_ttl_s} leaves no room for two heartbeats of "
                f"{heartbeat_interval_s}s and a request timeout of {self.request_timeout_s}s"
            )
        self._member_id = member_id or default_member_id()
        self._group = group.encode()
        self.lease_ttl_s = lease_ttl_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self._on_elected = on_elected
        self._on_lost = on_lost
        self._clock = clock
        self._driver = coordination.get_coordinator(
            backend_url,
            self._member_id.encode(),
            timeout=self.request_timeout_s,
            lock_timeout=lease_ttl_s,
            membership_timeout=lease_ttl_s,
        )
        self._mutex = threading.RLock()
        self._locks: dict[str, Lock] = {}
        self._valid_until: dict[str, float] = {}  # held leases: clock() deadline
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def member_id(self) -> str:
        return self._member_id

    def _lock_name(self, name: str) -> bytes:
        return self._group + b"/" + name.encode()

    # -- life cycle -----------------------------------------------------------------

    def start(self) -> None:
        self._driver.start(start_heart=False)
        try:
            self._driver.create_group(self._group).get()
        except coordination.GroupAlreadyExist:
            pass
        self._driver.join_group(self._group).get()
        LOG.info("joined coordination group=%s member=%s", self._group.decode(), self.member_id)
        self._stopped.clear()
        self._campaign()
        self._thread = threading.Thread(
            target=self._run, name="coordination-heartbeat", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._mutex:
            for name in list(self._valid_until):
                self._release(name)
        try:
            self._driver.stop()  # leaves the group
        except coordination.ToozError as e:
            LOG.warning("leaving coordination group=%s failed: %s", self._group.decode(), e)
        LOG.info("left coordination group=%s member=%s", self._group.decode(), self.member_id)

    def _run(self) -> None:
        while not self._stopped.wait(self.heartbeat_interval_s):
            try:
                self.heartbeat()
                self._campaign()
            except Exception:  # a loop boundary: the next round tries again
                LOG.exception("coordination heartbeat failed member=%s", self.member_id)

    # -- leases ---------------------------------------------------------------------

    def _holds(self, name: str) -> bool:
        with self._mutex:
            until = self._valid_until.get(name)
            return until is not None and self._clock() < until

    def _acquire(self, name: str) -> bool:
        with self._mutex:
            if self._holds(name):
                return True
            lock = self._locks.get(name)
            if lock is None:
                lock = self._locks[name] = self._driver.get_lock(self._lock_name(name))
            sent = self._clock()
            try:
                if not lock.acquire(blocking=False):
                    return False
            except coordination.ToozError as e:
                LOG.warning("lease %s not taken member=%s: %s", name, self.member_id, e)
                return False
            self._valid_until[name] = sent + self.lease_ttl_s
            LOG.info("lease taken name=%s member=%s", name, self.member_id)
            return True

    def _release(self, name: str) -> None:
        with self._mutex:
            self._valid_until.pop(name, None)
            lock = self._locks.pop(name, None)
        if lock is None:
            return
        try:
            lock.release()
        except coordination.ToozError as e:
            # The lease expires on its own after lease_ttl_s.
            LOG.warning("lease %s not released member=%s: %s", name, self.member_id, e)

    def _lose(self, name: str, why: str) -> None:
        LOG.error("lease lost name=%s member=%s: %s", name, self.member_id, why)
        self._release(name)
        if self._on_lost is not None:
            self._on_lost(name)

    def heartbeat(self) -> None:
        """Renews every held lease, or gives up those whose deadline has passed."""
        with self._mutex:
            now = self._clock()
            expired = [n for n, until in self._valid_until.items() if now >= until]
        for name in expired:
            self._lose(name, "not renewed within its TTL")
        sent = self._clock()
        try:
            self._driver.heartbeat()
        except coordination.ToozError as e:
            LOG.warning("heartbeat not answered member=%s: %s", self.member_id, e)
            return
        with self._mutex:
            for name in self._valid_until:
                self._valid_until[name] = sent + self.lease_ttl_s

    def _campaign(self) -> None:
        if not self._stopped.is_set() and not self._holds(LEADER) and self._acquire(LEADER):
            LOG.info("elected leader group=%s member=%s", self._group.decode(), self.member_id)
            if self._on_elected is not None:
                self._on_elected()

    # -- the interface --------------------------------------------------------------

    def is_leader(self) -> bool:
        return self._holds(LEADER)

    def lock_host(self, host: str) -> bool:
        return self._acquire(host_lock_name(host))

    def unlock_host(self, host: str) -> None:
        self._release(host_lock_name(host))

    def holds_host(self, host: str) -> bool:
        return self._holds(host_lock_name(host))

    def members(self) -> frozenset[str]:
        got = self._driver.get_members(self._group).get()
        return frozenset(m.decode() for m in got)
