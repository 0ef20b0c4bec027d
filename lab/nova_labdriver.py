"""A Nova compute driver whose live migrations move real lab guests between lab hosts.

Runs inside Nova's own virtualenv, loaded like ``nova_fakedriver.py``
(lab/nova_server.py ``--driver lab`` configures ``compute_driver =
nova_labdriver.LabLiveMigrateDriver``). Everything but live migration stays
the fake driver's: spawn and destroy only book-keep, so the test boots the
lab guest that stands for a server itself, on the server's host, with the
server's id as domain uuid and Nova's metadata in its XML
(``cluster.Lab.add_guest``).

``live_migration`` migrates that domain for real, as Nova's libvirt driver
does: peer to peer from the lab host of this compute service to the lab host
named ``dest``, the migration stream to the target's lab address
(``VIR_MIGRATE_PARAM_URI``), with post-copy permitted when ``[libvirt]
live_migration_permit_post_copy`` is set, else auto-converge when
``live_migration_permit_auto_converge`` is. The blocking ``migrateToURI3``
runs in a native thread on a connection of its own; the compute service's
green thread follows the job meanwhile: it saves the job's memory counters
in the migration record, serves force-complete (``migrateStartPostCopy``
when post-copy is permitted, else the guest is paused until the copy
converges, resumed where it ends up) and abort (``abortJob`` on the real
job), then calls ``post_method``, or ``recover_method`` on failure (with
``migration_status='cancelled'`` after an abort). Unlike Nova's libvirt
driver it leaves QEMU's downtime limit alone: the hostmaint agents tune the
job.

Compute host names are lab host names. The environment variable
``HOSTMAINT_NOVA_LAB_CONFIG`` names a JSON file::

    {"hosts": {"<lab host>": {"uri": "qemu+unix:///system?socket=...",
                              "migration_uri": "tcp://10.0.0.1"}, ...},
     "libvirt_python_dir": "<a folder holding libvirt.py and libvirtmod*.so>"}

Nova's virtualenv has no libvirt bindings of its own: ``libvirt_python_dir``
(optional) is appended to ``sys.path`` before ``libvirt`` is imported, so the
project's build of the bindings (same interpreter) can be used. Nova's test
base refuses imports of ``libvirt`` once it is set up (its
``ImportModulePoisonFixture``): the server calls :func:`preload_libvirt` before.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import threading as _threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from . import nova_fakedriver

LOG = logging.getLogger(__name__)

ENV_CONFIG = "HOSTMAINT_NOVA_LAB_CONFIG"
POLL_S = 0.5
COMPLETE = nova_fakedriver.COMPLETE
ABORT = nova_fakedriver.ABORT
_T = TypeVar("_T")


@dataclass(frozen=True)
class LabHostConfig:
    uri: str
    migration_uri: str


def load_config(path: str) -> tuple[dict[str, LabHostConfig], str]:
    """The lab hosts by name and the folder of the libvirt bindings ("" for none)."""
    with open(path) as f:
        raw = json.load(f)
    hosts = {
        name: LabHostConfig(uri=str(h["uri"]), migration_uri=str(h.get("migration_uri", "")))
        for name, h in raw["hosts"].items()
    }
    return hosts, str(raw.get("libvirt_python_dir", ""))


def _import_libvirt(extra_dir: str) -> ModuleType:
    if extra_dir and extra_dir not in sys.path:
        # Appended, so that Nova's own libraries always win.
        sys.path.append(extra_dir)
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    module: ModuleType = libvirt
    return module


def preload_libvirt() -> None:
    """Imports the libvirt bindings named by the lab's host map, before Nova's fixtures run."""
    path = os.environ.get(ENV_CONFIG)
    if not path:
        raise RuntimeError(f"{ENV_CONFIG} must name the lab's host map (JSON)")
    _import_libvirt(load_config(path)[1])


def _eventlet(module: str) -> Any:
    """An eventlet module when eventlet's monkey patching is in force, else None."""
    try:
        patcher: Any = importlib.import_module("eventlet.patcher")
    except ImportError:
        return None
    if not patcher.is_monkey_patched("thread"):
        return None
    return importlib.import_module(f"eventlet.{module}")


def _blocking(fn: Callable[..., _T], *args: Any) -> _T:
    """A libvirt call in a native thread, waited for cooperatively under eventlet."""
    tpool = _eventlet("tpool")
    if tpool is not None:
        result: _T = tpool.execute(fn, *args)
        return result
    return fn(*args)


def _native_thread(target: Callable[[], None], name: str) -> Any:
    """A real OS thread even when eventlet patched `threading`."""
    patcher = _eventlet("patcher")
    threading: Any = patcher.original("threading") if patcher is not None else _threading
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


class _Outcome:
    """What the migration thread leaves behind; written once, by that thread only."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.error_code: int | None = None


class LabLiveMigrateDriver(nova_fakedriver.PerServerLiveMigrateDriver):
    """The fake driver, with live migrations of the real lab guests."""

    def __init__(self, virtapi: Any, read_only: bool = False) -> None:
        super().__init__(virtapi, read_only)  # type: ignore[no-untyped-call]
        path = os.environ.get(ENV_CONFIG)
        if not path:
            raise RuntimeError(f"{ENV_CONFIG} must name the lab's host map (JSON)")
        self._lab_hosts, self._libvirt_dir = load_config(path)
        self._libvirt_module: ModuleType | None = None

    @property
    def _libvirt(self) -> ModuleType:
        if self._libvirt_module is None:
            self._libvirt_module = _import_libvirt(self._libvirt_dir)
        return self._libvirt_module

    def _lab_host(self, name: str) -> LabHostConfig:
        try:
            return self._lab_hosts[name]
        except KeyError:
            raise RuntimeError(f"no lab host {name!r} in {os.environ.get(ENV_CONFIG)}") from None

    def _open(self, uri: str) -> Any:
        return _blocking(self._libvirt.open, uri)

    def _flags(self) -> tuple[int, bool]:
        """Migration flags as nova.conf permits them, and whether post-copy is among them."""
        conf: Any = importlib.import_module("nova.conf").CONF.libvirt
        lv = self._libvirt
        flags = int(lv.VIR_MIGRATE_LIVE | lv.VIR_MIGRATE_PEER2PEER)
        postcopy = bool(conf.live_migration_permit_post_copy)
        if postcopy:
            flags |= int(lv.VIR_MIGRATE_POSTCOPY)
        elif conf.live_migration_permit_auto_converge:
            flags |= int(lv.VIR_MIGRATE_AUTO_CONVERGE)
        return flags, postcopy

    def live_migration(
        self,
        context: Any,
        instance: Any,
        dest: str,
        post_method: Callable[..., Any],
        recover_method: Callable[..., Any],
        block_migration: bool = False,
        migrate_data: Any = None,
    ) -> None:
        source = self._lab_host(self._host)
        target = self._lab_host(dest)
        lv = self._libvirt
        flags, postcopy = self._flags()
        params = {lv.VIR_MIGRATE_PARAM_URI: target.migration_uri} if target.migration_uri else {}
        migration = getattr(migrate_data, "migration", None)
        uuid = str(instance.uuid)
        self._requests.pop(uuid, None)
        LOG.info(
            "lab live migration starting vm=%s source=%s dest=%s uri=%s flags=%#x",
            uuid,
            self._host,
            dest,
            target.migration_uri,
            flags,
        )
        outcome = _Outcome()

        def migrate() -> None:
            # A native thread: libvirt calls only, no logging (its locks are green).
            conn = None
            try:
                conn = lv.open(source.uri)
                conn.lookupByUUIDString(uuid).migrateToURI3(target.uri, params, flags)
            except lv.libvirtError as e:
                outcome.error, outcome.error_code = e, e.get_error_code()
            except Exception as e:  # noqa: BLE001 - reported by the green thread
                outcome.error = e
            finally:
                if conn is not None:
                    conn.close()

        started = time.monotonic()
        thread = _native_thread(migrate, f"labmig/{uuid[:8]}")
        monitor = self._open(source.uri)
        paused = aborted = False
        try:
            dom = _blocking(monitor.lookupByUUIDString, uuid)
            while thread.is_alive():
                request = self._requests.pop(uuid, None)
                if request is not None and not self._serve(dom, uuid, request, postcopy):
                    self._requests.setdefault(uuid, request)  # no job yet: again next time
                elif request == ABORT:
                    aborted = True
                elif request == COMPLETE and not postcopy:
                    paused = True
                if migration is not None:
                    self._save_job_stats(dom, migration)
                time.sleep(POLL_S)
            thread.join()
        finally:
            self._requests.pop(uuid, None)
            _blocking(monitor.close)
        elapsed_s = time.monotonic() - started
        if outcome.error is None:
            LOG.info(
                "lab live migration completed vm=%s dest=%s elapsed_s=%.1f", uuid, dest, elapsed_s
            )
            if paused:
                self._resume(target.uri, uuid)
            if migration is not None:
                self._save_completed_stats(target.uri, uuid, migration)
            post_method(context, instance, dest, block_migration, migrate_data)
            return
        cancelled = aborted or outcome.error_code == lv.VIR_ERR_OPERATION_ABORTED
        LOG.warning(
            "lab live migration %s vm=%s dest=%s elapsed_s=%.1f error=%s",
            "cancelled" if cancelled else "failed",
            uuid,
            dest,
            elapsed_s,
            outcome.error,
        )
        if paused:
            self._resume(source.uri, uuid)
        if cancelled:
            recover_method(context, instance, dest, migrate_data, migration_status="cancelled")
        else:
            recover_method(context, instance, dest, migrate_data)

    def _serve(self, dom: Any, uuid: str, request: str, postcopy: bool) -> bool:
        """Acts on a force-complete or abort; False when the job has not started yet."""
        lv = self._libvirt
        try:
            if request == ABORT:
                _blocking(dom.abortJob)
                LOG.info("lab live migration abort requested vm=%s", uuid)
            elif postcopy:
                _blocking(dom.migrateStartPostCopy, 0)
                LOG.info("lab live migration switched to post-copy vm=%s", uuid)
            else:
                # Nova's way without post-copy: a paused guest dirties nothing.
                _blocking(dom.suspend)
                LOG.info("lab live migration force-complete: guest paused vm=%s", uuid)
            return True
        except lv.libvirtError as e:
            if e.get_error_code() == lv.VIR_ERR_OPERATION_INVALID:
                # The job is not there yet (or already gone): retried while the thread runs.
                return False
            LOG.warning("lab live migration %s refused vm=%s error=%s", request, uuid, e)
            return True

    def _save_job_stats(self, dom: Any, migration: Any) -> None:
        lv = self._libvirt
        try:
            stats = _blocking(dom.jobStats, 0)
        except lv.libvirtError:
            return  # the job ended between two polls
        if stats.get("type") != lv.VIR_DOMAIN_JOB_UNBOUNDED:
            return
        self._save(migration, stats)

    def _save_completed_stats(self, uri: str, uuid: str, migration: Any) -> None:
        """The finished job's counters, from the host the guest runs on now."""
        lv = self._libvirt
        try:
            conn = self._open(uri)
            try:
                dom = _blocking(conn.lookupByUUIDString, uuid)
                # Kept for whoever reads them next (an agent, an operator's virsh).
                flags = lv.VIR_DOMAIN_JOB_STATS_COMPLETED | lv.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED
                stats = _blocking(dom.jobStats, flags)
            finally:
                _blocking(conn.close)
        except lv.libvirtError as e:
            LOG.info("no completed job stats vm=%s error=%s", uuid, e)
            return
        self._save(migration, stats)

    @staticmethod
    def _save(migration: Any, stats: dict[str, Any]) -> None:
        try:
            migration.memory_total = int(stats.get("memory_total", 0))
            migration.memory_processed = int(stats.get("memory_processed", 0))
            migration.memory_remaining = int(stats.get("memory_remaining", 0))
            migration.disk_total = int(stats.get("disk_total", 0))
            migration.disk_processed = int(stats.get("disk_processed", 0))
            migration.disk_remaining = int(stats.get("disk_remaining", 0))
            migration.save()
        except Exception:  # progress is informative only
            LOG.exception("progress not saved migration=%s", migration.uuid)

    def _resume(self, uri: str, uuid: str) -> None:
        """Resumes the guest where it ended up if a force-complete paused it."""
        lv = self._libvirt
        try:
            conn = self._open(uri)
            try:
                dom = _blocking(conn.lookupByUUIDString, uuid)
                if _blocking(dom.state)[0] == lv.VIR_DOMAIN_PAUSED:
                    _blocking(dom.resume)
                    LOG.info("lab guest resumed vm=%s uri=%s", uuid, uri)
            finally:
                _blocking(conn.close)
        except lv.libvirtError as e:
            LOG.warning("lab guest not resumed vm=%s uri=%s error=%s", uuid, uri, e)

    def live_migration_force_complete(self, instance: Any) -> None:
        LOG.info("lab live migration force-complete vm=%s", instance.uuid)
        self._requests[instance.uuid] = COMPLETE

    def live_migration_abort(self, instance: Any) -> None:
        LOG.info("lab live migration abort vm=%s", instance.uuid)
        self._requests[instance.uuid] = ABORT
