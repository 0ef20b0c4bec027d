"""A fake Nova compute driver whose live migrations are controlled per server.

Runs inside Nova's own virtualenv: lab/nova_server.py adds this folder to
the path of the ``nova.virt`` package (Nova imports its compute driver as
``nova.virt.<compute_driver>``) and configures ``compute_driver =
nova_fakedriver.PerServerLiveMigrateDriver``.

Nova's own ``FakeLiveMigrateDriver`` keeps a migration running for up to 5 s
and its force-complete and abort act on every migration of the host at once.
This driver keeps one request slot per instance, so force-complete and abort
act on one server, and it decides how each migration behaves from the
server's metadata:

- ``hostmaint:migration_s``: seconds until the migration completes by itself
  (default: ``HOSTMAINT_NOVA_FAKE_MIGRATION_S``, else 1.0), or ``hold`` to keep
  it running until it is force-completed or aborted.
- ``hostmaint:migration_fail_s``: fail the migration after this many seconds
  (Nova's rollback marks the record ``failed`` and leaves the server where it
  was, as when a real hypervisor's job fails).

While a migration runs, the record's memory counters move as a real one's do:
remaining memory falls towards completion; a held migration stalls at 10 % of
the flavor's memory, like a guest dirtying memory faster than the link.

``live_migration`` runs in a green thread of the compute service: it waits
with ``time.sleep``, which eventlet's monkey patching (applied by Nova's
functional-test package) turns into a cooperative sleep.
"""

import logging
import os
import time

from nova.virt import fake

LOG = logging.getLogger(__name__)

METADATA_DURATION = "hostmaint:migration_s"
METADATA_FAIL = "hostmaint:migration_fail_s"
ENV_DEFAULT_DURATION = "HOSTMAINT_NOVA_FAKE_MIGRATION_S"
HOLD = "hold"
COMPLETE = "complete"
ABORT = "abort"
POLL_S = 0.05
PROGRESS_EVERY_S = 0.25
STALL_FRACTION = 0.1
MIB = 1024 * 1024


def _default_duration_s():
    try:
        return float(os.environ.get(ENV_DEFAULT_DURATION, "1.0"))
    except ValueError:
        return 1.0


def _metadata(instance):
    try:
        return dict(instance.metadata or {})
    except Exception:  # noqa: BLE001 - a lazy load that fails leaves defaults
        LOG.warning("metadata unavailable vm=%s", instance.uuid)
        return {}


def _plan(instance):
    """(duration_s or None to hold, fail_after_s or None) for this server."""
    meta = _metadata(instance)
    duration = meta.get(METADATA_DURATION)
    fail = meta.get(METADATA_FAIL)
    if duration == HOLD:
        duration_s = None
    else:
        try:
            duration_s = float(duration) if duration is not None else _default_duration_s()
        except ValueError:
            duration_s = _default_duration_s()
    try:
        fail_s = float(fail) if fail is not None else None
    except ValueError:
        fail_s = None
    return duration_s, fail_s


class PerServerLiveMigrateDriver(fake.FakeLiveMigrateDriver):
    """Live migrations that run, complete, fail or abort one server at a time."""

    def __init__(self, virtapi, read_only=False):
        super().__init__(virtapi, read_only)
        # instance uuid -> COMPLETE or ABORT, set by the API's actions.
        self._requests = {}

    def live_migration(
        self,
        context,
        instance,
        dest,
        post_method,
        recover_method,
        block_migration=False,
        migrate_data=None,
    ):
        duration_s, fail_s = _plan(instance)
        migration = getattr(migrate_data, "migration", None)
        total = int(instance.flavor.memory_mb) * MIB
        started = time.monotonic()
        last_progress = -PROGRESS_EVERY_S
        outcome = None
        LOG.info(
            "fake live migration started vm=%s dest=%s duration_s=%s fail_s=%s",
            instance.uuid,
            dest,
            duration_s,
            fail_s,
        )
        try:
            while outcome is None:
                elapsed = time.monotonic() - started
                outcome = self._requests.pop(instance.uuid, None)
                if outcome is not None:
                    break
                if fail_s is not None and elapsed >= fail_s:
                    outcome = "fail"
                    break
                if duration_s is not None and elapsed >= duration_s:
                    outcome = COMPLETE
                    break
                if migration is not None and elapsed - last_progress >= PROGRESS_EVERY_S:
                    last_progress = elapsed
                    self._report_progress(migration, total, elapsed, duration_s)
                time.sleep(POLL_S)
        finally:
            self._requests.pop(instance.uuid, None)
        LOG.info("fake live migration ends vm=%s outcome=%s", instance.uuid, outcome)
        if outcome == ABORT:
            recover_method(context, instance, dest, migrate_data, migration_status="cancelled")
        elif outcome == "fail":
            recover_method(context, instance, dest, migrate_data)
        else:
            if migration is not None:
                self._save_progress(migration, total, 0)
            post_method(context, instance, dest, block_migration, migrate_data)

    def _report_progress(self, migration, total, elapsed, duration_s):
        if duration_s is None:
            fraction_left = max(STALL_FRACTION, 1.0 - elapsed / 10.0)
        else:
            fraction_left = max(0.0, 1.0 - elapsed / max(duration_s, POLL_S))
        self._save_progress(migration, total, int(total * fraction_left))

    @staticmethod
    def _save_progress(migration, total, remaining):
        try:
            migration.memory_total = total
            migration.memory_remaining = remaining
            migration.memory_processed = total - remaining
            migration.disk_total = 0
            migration.disk_processed = 0
            migration.disk_remaining = 0
            migration.save()
        except Exception:  # progress is informative only
            LOG.exception("progress not saved migration=%s", migration.uuid)

    def live_migration_force_complete(self, instance):
        LOG.info("fake live migration force-complete vm=%s", instance.uuid)
        self._requests[instance.uuid] = COMPLETE

    def live_migration_abort(self, instance):
        LOG.info("fake live migration abort vm=%s", instance.uuid)
        self._requests[instance.uuid] = ABORT
