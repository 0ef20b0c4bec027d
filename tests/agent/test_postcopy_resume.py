"""A post-copy whose link breaks: the agent reports it paused, never as ended, refuses to
abort it, and resumes it to the same destination when asked.

libvirt's test:/// driver runs no migrations, so the tracker runs here over a driver
that plays libvirt 9.0's part as its qemu_migration.c does it: migrateToURI3 raises
"failed in post-copy phase" and leaves the source domain PAUSED/POSTCOPY_FAILED with its
job kept; a resume (VIR_MIGRATE_POSTCOPY_RESUME) is refused while the link is down and
otherwise runs the post-copy to its end. The lab test (tests/lab/test_postcopy_recovery.py)
runs the same on real QEMU.
"""

from __future__ import annotations

import threading
import time
from typing import cast

import pytest

from hostmaint.agent import errors
from hostmaint.agent.libvirt_driver import (
    LibvirtDriver,
    RawDomain,
    job_stats_from_libvirt,
    postcopy_failed,
)
from hostmaint.agent.migrations import MigrationTracker
from hostmaint.agent.types import (
    CpuDefinition,
    DomainConfig,
    DomainState,
    JobStats,
    MigrationPhase,
    MigrationRequest,
)

UUID = "6f1a2b3c-0000-4000-8000-000000000017"
DEST = "qemu+tcp://target/system"
LINK_DOWN = "operation failed: job 'migration out' failed in post-copy phase"


class PostcopyLibvirt:
    """The LibvirtDriver calls the tracker makes, for one domain migrating in post-copy."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.state = DomainState.RUNNING
        self.phase: MigrationPhase | None = None
        self.broken = False
        self.gone = False
        self.link_up = True
        self.calls: list[tuple[MigrationRequest, bool]] = []
        self._end: str | None = None  # what the blocked migrateToURI3 call does next

    # -- what the test does --------------------------------------------------------------

    def cut_link(self) -> None:
        with self.lock:
            self.link_up = False
            self._end = "break"
            self.lock.notify_all()

    def finish(self, end: str = "complete") -> None:
        with self.lock:
            self._end = end
            self.lock.notify_all()

    # -- the driver's contract --------------------------------------------------------

    def add_listener(self, _listener: object) -> None:
        pass

    def domain(self, uuid: str) -> RawDomain:
        with self.lock:
            if self.gone:
                raise errors.DomainNotFound(uuid)
            config = DomainConfig(uuid, "pc", 1 << 30, 1 << 30, 1, CpuDefinition(), (), (), None)
            return RawDomain(
                config=config,
                state=self.state,
                paused_reason=13 if self.broken else -1,
                persistent=True,
                rss_bytes=0,
                unused_bytes=0,
                migrating=self.phase is not None,
                postcopy_failed=self.broken,
            )

    def postcopy_state(self, uuid: str) -> tuple[DomainState, bool]:
        raw = self.domain(uuid)
        return raw.state, raw.postcopy_failed

    def job_stats(self, uuid: str, completed: bool = False) -> JobStats | None:
        with self.lock:
            if self.gone:
                raise errors.DomainNotFound(uuid)
            if self.broken:
                return JobStats(phase=MigrationPhase.POSTCOPY_PAUSED, active=True)
            if self.phase is None:
                return None
            return JobStats(phase=self.phase, active=True, memory_total_bytes=1 << 30)

    def max_downtime_ms(self, _uuid: str) -> int:
        return 300

    def set_max_downtime(self, _uuid: str, _ms: int) -> None:
        pass

    def abort_job(self, _uuid: str) -> None:
        raise AssertionError("a post-copy must never be aborted")

    def migrate(self, request: MigrationRequest, *, resume: bool = False) -> None:
        with self.lock:
            self.calls.append((request, resume))
            if resume:
                if not self.broken:
                    raise errors.OperationRefused(UUID, "resume", "post-copy has not failed")
                if not self.link_up:
                    raise errors.OperationRefused(UUID, "resume", "unable to connect: no route")
                self.broken = False
            self.phase = MigrationPhase.POSTCOPY if resume else MigrationPhase.PRECOPY
            self.state = DomainState.PAUSED if resume else DomainState.RUNNING
            self.lock.notify_all()
            while self._end is None:
                self.lock.wait()
            end, self._end = self._end, None
            if end == "complete-with-error":
                self.gone, self.phase = True, None
                raise errors.OperationRefused(UUID, "migrate", "lost connection to destination")
            if end == "break":
                self.state, self.broken, self.phase = DomainState.PAUSED, True, None
                raise errors.OperationRefused(UUID, "migrate", LINK_DOWN)
            self.gone, self.phase = True, None


@pytest.fixture
def libvirt_() -> PostcopyLibvirt:
    return PostcopyLibvirt()


@pytest.fixture
def tracker(libvirt_: PostcopyLibvirt) -> MigrationTracker:
    stop = threading.Event()
    return MigrationTracker(cast(LibvirtDriver, libvirt_), clock=time.monotonic, wait=stop.wait)


def _until(check: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not callable(check) or not check():
        assert time.monotonic() < deadline, "timed out"
        threading.Event().wait(0.01)


def _broken_migration(tracker: MigrationTracker, libvirt_: PostcopyLibvirt) -> MigrationRequest:
    request = MigrationRequest(
        UUID, DEST, migration_uri="tcp://10.0.0.2", allow_postcopy=True, auto_converge=True
    )
    tracker.migrate(request)
    libvirt_.cut_link()
    _until(lambda: libvirt_.broken)
    return request


def test_a_broken_postcopy_is_reported_paused_and_never_as_ended(
    tracker: MigrationTracker, libvirt_: PostcopyLibvirt
) -> None:
    _broken_migration(tracker, libvirt_)
    _until(lambda: not tracker._jobs[UUID].thread.is_alive())  # type: ignore[union-attr]
    sample = tracker.current(UUID)
    assert sample is not None and sample.stats.phase is MigrationPhase.POSTCOPY_PAUSED
    assert not sample.final
    assert not tracker.has_outcome(UUID)
    with pytest.raises(errors.OperationRefused, match="resume it"):
        tracker.tune(
            UUID,
            max_downtime_ms=None,
            bandwidth_bytes_per_s=None,
            start_postcopy=False,
            abort=True,
            vcpu_throttle_pct=None,
        )


def test_the_resume_goes_to_the_same_destination_with_the_same_flags(
    tracker: MigrationTracker, libvirt_: PostcopyLibvirt
) -> None:
    original = _broken_migration(tracker, libvirt_)
    with pytest.raises(errors.InvalidArgument, match="resumes there only"):
        tracker.resume(UUID, "qemu+tcp://elsewhere/system", "")
    # the link is still down: libvirt refuses, the domain stays paused, a retry may follow
    with pytest.raises(errors.OperationRefused, match="unable to connect"):
        tracker.resume(UUID, "", "")
    assert libvirt_.broken
    assert not tracker.has_outcome(UUID)
    libvirt_.link_up = True
    resumed = tracker.resume(UUID, "", "")
    assert resumed == original
    assert libvirt_.calls[-1] == (original, True)
    assert tracker.current(UUID).stats.phase is MigrationPhase.POSTCOPY  # type: ignore[union-attr]
    with pytest.raises(errors.OperationRefused, match="no broken post-copy"):
        tracker.resume(UUID, "", "")  # it runs again
    watch = tracker.watch(UUID, 0.05, 0)
    assert next(watch).stats.phase is MigrationPhase.POSTCOPY
    libvirt_.finish()
    final = [s for s in watch if s.final]
    assert [s.stats.phase for s in final] == [MigrationPhase.COMPLETED]


def test_a_resume_of_another_clients_migration_needs_its_destination(
    tracker: MigrationTracker, libvirt_: PostcopyLibvirt
) -> None:
    with pytest.raises(errors.OperationRefused, match="no broken post-copy"):
        tracker.resume(UUID, DEST, "")
    # nova-compute's migration broke: the agent never saw its request
    with libvirt_.lock:
        libvirt_.state, libvirt_.broken = DomainState.PAUSED, True
    with pytest.raises(errors.InvalidArgument, match="name the destination"):
        tracker.resume(UUID, "", "")
    resumed = tracker.resume(UUID, DEST, "tcp://10.0.0.2")
    assert (resumed.destination_uri, resumed.migration_uri) == (DEST, "tcp://10.0.0.2")
    assert resumed.allow_postcopy
    libvirt_.finish()
    _until(lambda: tracker.has_outcome(UUID))


def test_a_paused_postcopy_whose_source_vanishes_is_not_reported_moved(
    tracker: MigrationTracker, libvirt_: PostcopyLibvirt
) -> None:
    _broken_migration(tracker, libvirt_)
    watch = tracker.watch(UUID, 0.05, 0)
    assert next(watch).stats.phase is MigrationPhase.POSTCOPY_PAUSED
    with libvirt_.lock:
        libvirt_.gone = True  # destroyed by hand
    final = [s for s in watch if s.final]
    assert [s.stats.phase for s in final] == [MigrationPhase.FAILED]
    assert "paused" in final[0].stats.error


def test_libvirts_states_of_a_broken_postcopy() -> None:
    # (state, reason) as libvirt 9.0 numbers them: PAUSED=3, RUNNING=1
    assert postcopy_failed(3, 13)  # the source: PAUSED / POSTCOPY_FAILED
    assert postcopy_failed(1, 11)  # the destination: RUNNING / POSTCOPY_FAILED
    assert not postcopy_failed(3, 12)  # the source of a post-copy that runs
    assert not postcopy_failed(1, 10)  # its destination
    # the broken job shows as paused whatever type libvirt gives it (none, unbounded)
    for job_type in (0, 2):
        stats = job_stats_from_libvirt({"type": job_type}, 13)
        assert stats.phase is MigrationPhase.POSTCOPY_PAUSED and stats.active


def test_a_resume_whose_call_errs_after_the_source_left_is_completed(
    tracker: MigrationTracker, libvirt_: PostcopyLibvirt
) -> None:
    """Seen in the lab: a resume that waited out a 30 s cut ended its libvirt call with an
    error after the post-copy had completed (the source domain undefined)."""
    _broken_migration(tracker, libvirt_)
    libvirt_.link_up = True
    tracker.resume(UUID, "", "")
    watch = tracker.watch(UUID, 0.05, 0)
    assert next(watch).stats.phase is MigrationPhase.POSTCOPY
    libvirt_.finish("complete-with-error")
    final = [s for s in watch if s.final]
    assert [s.stats.phase for s in final] == [MigrationPhase.COMPLETED]
