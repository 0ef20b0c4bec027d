"""Migration jobs on this host: start, watch, tune, and remember how they ended.

A job may be ours (started by `Migrate`) or anybody's (nova-compute's): both
are watched the same way, by sampling libvirt's job stats. How a job ended
comes, in order of trust, from our own `migrateToURI3` call, libvirt's
job-completed event, or the domain's fate (gone from this host after a
migration, or still running here).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from hostmaint.agent import errors, tuning
from hostmaint.agent.libvirt_driver import DomainEvent, LibvirtDriver
from hostmaint.agent.types import DomainState, JobStats, MigrationPhase, MigrationRequest

LOG = logging.getLogger(__name__)
# How long to keep the outcome of a finished job for late watchers.
_OUTCOME_TTL_S = 600.0
_JOB_APPEAR_TIMEOUT_S = 10.0
_APPEAR_POLL_S = 0.05
_LIFECYCLE_STOPPED_MIGRATED = "5:3"  # VIR_DOMAIN_EVENT_STOPPED : _STOPPED_MIGRATED
# How long ResumeMigration waits for libvirt to take the resume (the domain leaves its
# post-copy-failed state) or refuse it; a resume still connecting after that is followed
# with WatchMigration.
_RESUME_TAKE_S = 5.0


@dataclass(frozen=True)
class Sample:
    """One progress sample for WatchMigration."""

    stats: JobStats
    max_downtime_ms: int
    max_downtime_set_by: str
    final: bool
    sampled_at: float


@dataclass(frozen=True)
class Tuned:
    """What a tune applied, in order; the downtime limit in force after it; with a
    bandwidth change, the cap it replaced (0: none)."""

    applied: list[str]
    max_downtime_ms: int
    previous_bandwidth_bytes_per_s: int | None = None


@dataclass
class _Outcome:
    phase: MigrationPhase
    error: str
    stats: JobStats | None
    at: float


@dataclass
class _Job:
    domain_uuid: str
    ours: bool
    thread: threading.Thread | None = None
    downtime_floor_ms: int | None = None
    last: JobStats | None = None
    # what the migration was started (or last resumed) with: a broken post-copy resumes
    # to the same destination with the same flags
    request: MigrationRequest | None = None
    resumes: int = 0
    # why the last migrateToURI3 call (start or resume) ended with the post-copy broken
    broken: str = ""


class MigrationTracker:
    def __init__(
        self,
        driver: LibvirtDriver,
        *,
        clock: Callable[[], float],
        wait: Callable[[float], bool],
    ) -> None:
        self._driver = driver
        self._clock = clock
        self._wait = wait
        self._lock = threading.Condition()
        self._jobs: dict[str, _Job] = {}
        self._outcomes: dict[str, _Outcome] = {}
        self._migrated_away: dict[str, float] = {}
        self._throttles: dict[str, int] = {}
        driver.add_listener(self._on_event)

    # -- events ---------------------------------------------------------------------

    def _on_event(self, event: DomainEvent) -> None:
        with self._lock:
            if event.kind == "job-completed" and event.job is not None:
                self._outcomes[event.domain_uuid] = _Outcome(
                    event.job.phase, event.job.error, event.job, self._clock()
                )
            elif event.kind == "lifecycle" and event.detail == _LIFECYCLE_STOPPED_MIGRATED:
                self._migrated_away[event.domain_uuid] = self._clock()
            self._lock.notify_all()

    def _prune(self) -> None:
        horizon = self._clock() - _OUTCOME_TTL_S
        for uuid in [u for u, o in self._outcomes.items() if o.at < horizon]:
            del self._outcomes[uuid]
        for uuid in [u for u, t in self._migrated_away.items() if t < horizon]:
            del self._migrated_away[uuid]

    # -- start ----------------------------------------------------------------------

    def migrate(self, request: MigrationRequest) -> float:
        """Starts the migration in its own thread; returns once libvirt runs the job."""
        raw = self._driver.domain(request.domain_uuid)
        if raw.state is not DomainState.RUNNING:
            raise errors.OperationRefused(
                request.domain_uuid, "migrate", f"the domain is {raw.state}, not running"
            )
        with self._lock:
            self._prune()
            job = self._jobs.get(request.domain_uuid)
            if raw.migrating or (
                job is not None and job.thread is not None and job.thread.is_alive()
            ):
                raise errors.MigrationBusy(request.domain_uuid)
            job = _Job(request.domain_uuid, ours=True, request=request)
            self._jobs[request.domain_uuid] = job
            self._outcomes.pop(request.domain_uuid, None)
            self._migrated_away.pop(request.domain_uuid, None)
        job.thread = threading.Thread(
            target=self._run,
            args=(request,),
            name=f"migrate/{request.domain_uuid[:8]}",
            daemon=True,
        )
        started_at = self._clock()
        job.thread.start()
        self._await_job(request.domain_uuid, job)
        if request.max_downtime_ms:
            with self._lock:
                job.downtime_floor_ms = request.max_downtime_ms
            try:
                self._driver.set_max_downtime(request.domain_uuid, request.max_downtime_ms)
            except (errors.DomainNotFound, errors.OperationRefused):
                # The job ended before its limit could be set: a short migration that
                # completed is a success, anything else is the caller's error.
                if self._sample(request.domain_uuid) is not None:
                    raise  # refused while the job still runs
                outcome = self._await_outcome(request.domain_uuid)
                if outcome.phase is not MigrationPhase.COMPLETED:
                    raise errors.OperationRefused(
                        request.domain_uuid, "migrate", outcome.error or "failed"
                    ) from None
        return started_at

    def _await_job(self, domain_uuid: str, job: _Job) -> None:
        deadline = self._clock() + _JOB_APPEAR_TIMEOUT_S
        while self._clock() < deadline:
            with self._lock:
                outcome = self._outcomes.get(domain_uuid)
            if outcome is not None and job.thread is not None and not job.thread.is_alive():
                if outcome.phase is MigrationPhase.COMPLETED:
                    return  # it finished before we looked: nothing left to tune
                raise errors.OperationRefused(domain_uuid, "migrate", outcome.error or "failed")
            try:
                if self._driver.job_stats(domain_uuid) is not None:
                    return
            except errors.DomainNotFound:
                return  # already gone: the migration completed at once
            except errors.HypervisorUnavailable:
                # The shared connection broke (libvirtd restarted); the migration runs on
                # its own connection: keep looking (reconnecting) until it shows or ends.
                LOG.info("libvirt connection lost while a migration starts vm=%s", domain_uuid)
            if self._wait(_APPEAR_POLL_S):
                return
        raise errors.HypervisorError("migrate", 0, "the migration job did not start in time")

    def _run(self, request: MigrationRequest, resume: bool = False) -> None:
        uuid = request.domain_uuid
        try:
            self._driver.migrate(request, resume=resume)
        except errors.AgentError as e:
            if self._postcopy_broke(uuid, e):
                # Not an end: the guest's newest state is on the destination, the rest of
                # its memory here; libvirt keeps the job for a resume (ResumeMigration).
                LOG.warning(
                    "post-copy broke, the domain stays paused until resumed vm=%s dest=%s error=%s",
                    uuid,
                    request.destination_uri,
                    e,
                )
                with self._lock:
                    job = self._jobs.setdefault(uuid, _Job(uuid, ours=True, request=request))
                    job.broken = str(e)
                    self._lock.notify_all()
                return
            if resume and self._left_host(uuid):
                # The source is undefined only once the post-copy completed: the call's
                # error came after the end (seen: a resume that waited out a 30 s cut).
                LOG.warning(
                    "resumed post-copy completed, its call ended with an error vm=%s error=%s",
                    uuid,
                    e,
                )
                self._finish(uuid, MigrationPhase.COMPLETED, "")
                return
            phase = MigrationPhase.FAILED
            if "cancel" in str(e).lower() or "abort" in str(e).lower():
                phase = MigrationPhase.CANCELLED
            LOG.warning("migration ended phase=%s vm=%s error=%s", phase, uuid, e)
            self._finish(uuid, phase, str(e))
        except Exception as e:  # thread boundary: record, never lose the outcome
            LOG.exception("migration thread crashed vm=%s", uuid)
            self._finish(uuid, MigrationPhase.FAILED, f"internal error: {e}")
        else:
            LOG.info("migration completed vm=%s dest=%s", uuid, request.destination_uri)
            self._finish(uuid, MigrationPhase.COMPLETED, "")

    def _left_host(self, uuid: str) -> bool:
        try:
            self._driver.postcopy_state(uuid)
        except errors.DomainNotFound:
            return True
        except errors.AgentError:
            return False  # libvirt unreachable: not known
        return False

    def _postcopy_broke(self, uuid: str, error: errors.AgentError) -> bool:
        """Whether a migrateToURI3 call ended because its post-copy broke (the domain is
        left paused, post-copy-failed), rather than with the migration's end."""
        try:
            return self._driver.postcopy_state(uuid)[1]
        except errors.DomainNotFound:
            return False
        except errors.AgentError:
            # libvirt unreachable: its message is all there is; an end recorded here would
            # turn a resumable VM into a failed migration
            return "post-copy" in str(error)

    def _finish(self, uuid: str, phase: MigrationPhase, error: str) -> None:
        with self._lock:
            previous = self._outcomes.get(uuid)
            stats = previous.stats if previous is not None else None
            self._outcomes[uuid] = _Outcome(phase, error, stats, self._clock())
            self._lock.notify_all()

    # -- watch ----------------------------------------------------------------------

    def watch(
        self, domain_uuid: str, interval_s: float, start_timeout_s: float
    ) -> Iterator[Sample]:
        """Samples the job until it ends; the last sample is final and carries the result."""
        deadline = self._clock() + start_timeout_s
        stats = self._sample(domain_uuid)
        while stats is None:
            with self._lock:
                outcome = self._outcomes.get(domain_uuid)
            if outcome is not None:
                yield self._final_sample(domain_uuid, None)
                return
            if self._clock() >= deadline:
                raise errors.NoMigrationJob(domain_uuid)
            if self._wait(min(interval_s, 0.2)):
                return
            stats = self._sample(domain_uuid)
        last = stats
        while stats is not None:
            last = stats
            yield self._progress_sample(domain_uuid, stats)
            if self._wait(interval_s):
                return
            stats = self._sample(domain_uuid)
        yield self._final_sample(domain_uuid, last)

    def current(self, domain_uuid: str) -> Sample | None:
        """A progress sample of the domain's running job now; None when none runs (or the
        hypervisor reports no job statistics)."""
        try:
            stats = self._driver.job_stats(domain_uuid)
        except (errors.DomainNotFound, errors.OperationRefused, errors.Unsupported):
            return None  # gone, stopped here, or a hypervisor without job statistics
        if stats is None or not stats.active:
            return None
        return self._progress_sample(domain_uuid, stats)

    def _sample(self, domain_uuid: str) -> JobStats | None:
        try:
            stats = self._driver.job_stats(domain_uuid)
        except errors.DomainNotFound:
            return None  # the domain left this host: the migration just finished
        except errors.OperationRefused:
            return None  # the domain stopped running here: the migration just finished
        except errors.Unsupported:
            raise errors.Unsupported(
                "watch migration", "this hypervisor reports no job statistics"
            ) from None
        if stats is None or not stats.active:
            return None
        with self._lock:
            job = self._jobs.setdefault(domain_uuid, _Job(domain_uuid, ours=False))
            job.last = stats
            floor = job.downtime_floor_ms
        self._hold_floor(domain_uuid, floor)
        return stats

    def _hold_floor(self, domain_uuid: str, floor_ms: int | None) -> None:
        if floor_ms is None:
            return
        try:
            current = self._driver.max_downtime_ms(domain_uuid)
            again = tuning.reassert_downtime(current, floor_ms)
            if again is not None:
                LOG.info(
                    "max downtime lowered externally, re-asserting vm=%s current_ms=%d floor_ms=%d",
                    domain_uuid,
                    current,
                    again,
                )
                self._driver.set_max_downtime(domain_uuid, again)
        except (errors.OperationRefused, errors.DomainNotFound):
            pass  # the job ended between the sample and the check

    def _progress_sample(self, domain_uuid: str, stats: JobStats) -> Sample:
        try:
            current = self._driver.max_downtime_ms(domain_uuid)
        except (errors.OperationRefused, errors.DomainNotFound):
            current = 0  # the job ended between the two calls
        with self._lock:
            job = self._jobs.get(domain_uuid)
            floor = job.downtime_floor_ms if job is not None else None
        return Sample(
            stats=stats,
            max_downtime_ms=current,
            max_downtime_set_by=tuning.downtime_set_by(current, floor),
            final=False,
            sampled_at=self._clock(),
        )

    def _final_sample(self, domain_uuid: str, last: JobStats | None) -> Sample:
        outcome = self._await_outcome(domain_uuid)
        base = outcome.stats or last or JobStats(phase=outcome.phase, active=False)
        stats = replace(base, phase=outcome.phase, active=False, error=outcome.error)
        with self._lock:
            job = self._jobs.pop(domain_uuid, None)
        floor = job.downtime_floor_ms if job is not None else None
        return Sample(
            stats=stats,
            max_downtime_ms=floor or 0,
            max_downtime_set_by=tuning.SET_BY_HOSTMAINT if floor else "",
            final=True,
            sampled_at=self._clock(),
        )

    def _await_outcome(self, domain_uuid: str) -> _Outcome:
        """How the job ended. Our own thread's word is final; otherwise events or facts."""
        with self._lock:
            job = self._jobs.get(domain_uuid)
        if job is not None and job.thread is not None:
            job.thread.join(timeout=30.0)
        was_paused = job is not None and (
            job.last is not None and job.last.phase is MigrationPhase.POSTCOPY_PAUSED
        )
        deadline = self._clock() + 2.0
        with self._lock:
            while domain_uuid not in self._outcomes and self._clock() < deadline:
                self._lock.wait(0.1)
            outcome = self._outcomes.get(domain_uuid)
            migrated = domain_uuid in self._migrated_away
        if outcome is not None:
            return outcome
        completed = self._completed_stats(domain_uuid)
        if completed is not None and completed.phase.final:
            return _Outcome(completed.phase, completed.error, completed, self._clock())
        if migrated:
            return _Outcome(MigrationPhase.COMPLETED, "", None, self._clock())
        if was_paused:
            # a broken post-copy whose source domain went away without a resume that ended
            # (destroyed here, or resumed by another client): not a move this agent saw
            return _Outcome(
                MigrationPhase.FAILED,
                "the domain left this host while its post-copy was paused, not resumed here",
                None,
                self._clock(),
            )
        if not self._still_here(domain_uuid):
            return _Outcome(MigrationPhase.COMPLETED, "", None, self._clock())
        return _Outcome(
            MigrationPhase.FAILED,
            "the job ended and the domain still runs here",
            None,
            self._clock(),
        )

    def _completed_stats(self, domain_uuid: str) -> JobStats | None:
        try:
            return self._driver.job_stats(domain_uuid, completed=True)
        except errors.AgentError:
            return None  # gone, or no completed stats kept: fall back to the domain's fate

    def _still_here(self, domain_uuid: str) -> bool:
        try:
            return self._driver.domain(domain_uuid).state is DomainState.RUNNING
        except errors.DomainNotFound:
            return False

    # -- resume ---------------------------------------------------------------------

    def resume(
        self, domain_uuid: str, destination_uri: str, migration_uri: str
    ) -> MigrationRequest:
        """Resumes the domain's broken post-copy to its destination in a thread of its own;
        returns once libvirt took the resume (the domain left its post-copy-failed state)
        or after a few seconds while it still connects; raises when libvirt refused it.

        For a migration this agent started, the destination and flags are the original
        ones (another destination is refused); for another client's (nova-compute's),
        `destination_uri` must name it and the resume carries post-copy and the
        persistence flags only (libvirt takes the rest from the paused job).
        """
        state, failed = self._driver.postcopy_state(domain_uuid)
        if not failed:
            raise errors.OperationRefused(
                domain_uuid,
                "resume post-copy",
                f"no broken post-copy to resume (the domain is {state} here)",
            )
        if state is not DomainState.PAUSED:
            raise errors.OperationRefused(
                domain_uuid,
                "resume post-copy",
                "this host is the destination of the broken post-copy: resume it on its source",
            )
        with self._lock:
            job = self._jobs.get(domain_uuid)
            if job is not None and job.thread is not None and job.thread.is_alive():
                raise errors.MigrationBusy(domain_uuid)
            original = job.request if job is not None else None
            if original is not None:
                if destination_uri and destination_uri != original.destination_uri:
                    raise errors.InvalidArgument(
                        "destination_uri",
                        f"the post-copy went to {original.destination_uri}: it resumes there only",
                    )
                request = replace(original, migration_uri=migration_uri or original.migration_uri)
            elif not destination_uri:
                raise errors.InvalidArgument(
                    "destination_uri",
                    "this agent did not start the migration: name the destination it went to",
                )
            else:
                request = MigrationRequest(
                    domain_uuid, destination_uri, migration_uri=migration_uri, allow_postcopy=True
                )
            if job is None:
                job = _Job(domain_uuid, ours=False)
                self._jobs[domain_uuid] = job
            job.request, job.broken = request, ""
            job.resumes += 1
            self._outcomes.pop(domain_uuid, None)
            thread = threading.Thread(
                target=self._run,
                args=(request, True),
                name=f"resume/{domain_uuid[:8]}",
                daemon=True,
            )
            job.thread = thread
        thread.start()
        deadline = self._clock() + _RESUME_TAKE_S
        while True:
            if not thread.is_alive():
                with self._lock:
                    why = job.broken
                    outcome = self._outcomes.get(domain_uuid)
                if why:
                    raise errors.OperationRefused(domain_uuid, "resume post-copy", why)
                if outcome is not None and outcome.phase is not MigrationPhase.COMPLETED:
                    raise errors.OperationRefused(
                        domain_uuid, "resume post-copy", outcome.error or str(outcome.phase)
                    )
                return request
            try:
                if not self._driver.postcopy_state(domain_uuid)[1]:
                    return request  # libvirt took it: post-copy runs again
            except errors.DomainNotFound:
                return request  # resumed and done already
            if self._clock() >= deadline or self._wait(_APPEAR_POLL_S):
                return request

    def has_outcome(self, domain_uuid: str) -> bool:
        """Whether a job of this domain ended here recently (or it migrated away)."""
        with self._lock:
            self._prune()
            return domain_uuid in self._outcomes or domain_uuid in self._migrated_away

    def vcpu_throttle_pct(self, domain_uuid: str) -> int:
        with self._lock:
            return self._throttles.get(domain_uuid, 0)

    # -- tune -----------------------------------------------------------------------

    def tune(
        self,
        domain_uuid: str,
        *,
        max_downtime_ms: int | None,
        bandwidth_bytes_per_s: int | None,
        start_postcopy: bool,
        abort: bool,
        vcpu_throttle_pct: int | None,
        lower_max_downtime: bool = False,
    ) -> Tuned:
        """Applies the changes in a safe order."""
        applied: list[str] = []
        needs_job = max_downtime_ms is not None or bandwidth_bytes_per_s is not None
        needs_job = needs_job or start_postcopy or abort
        if vcpu_throttle_pct is not None:
            quota = tuning.vcpu_quota_pct(vcpu_throttle_pct)
            raw = self._driver.domain(domain_uuid)
            if raw.state is not DomainState.RUNNING:
                raise errors.OperationRefused(
                    domain_uuid, "throttle vCPUs", f"domain is {raw.state}"
                )
        running = None
        if needs_job or vcpu_throttle_pct:
            try:
                running = self._driver.job_stats(domain_uuid)
            except errors.Unsupported:
                if needs_job:
                    raise
                # a driver with no jobs (libvirt's test:///) migrates nothing
        if needs_job and running is None:
            raise errors.NoMigrationJob(domain_uuid)
        if vcpu_throttle_pct and running is not None:
            # libvirt sets scheduler parameters under a modify job, which a migration's job
            # excludes: the call would wait for the migration to end (or libvirt's 30 s)
            # and then throttle a guest that no longer migrates.
            raise errors.OperationRefused(
                domain_uuid,
                "throttle vCPUs",
                "libvirt cannot change a migrating domain's scheduler parameters "
                "until its migration ends",
            )
        if running is not None and running.phase is MigrationPhase.POSTCOPY_PAUSED:
            raise errors.OperationRefused(
                domain_uuid,
                "tune migration",
                "its post-copy broke and is paused: resume it (ResumeMigration); an abort "
                "would lose the guest, whose newest state is on the destination",
            )
        if abort and running is not None and running.phase is MigrationPhase.POSTCOPY:
            raise errors.OperationRefused(
                domain_uuid,
                "abort",
                "the migration runs in post-copy: the guest runs on the destination already",
            )
        current = self._driver.max_downtime_ms(domain_uuid) if needs_job else 0
        if abort:
            self._driver.abort_job(domain_uuid)
            return Tuned(["abort"], current)
        if max_downtime_ms is not None:
            decision = tuning.decide_max_downtime(current, max_downtime_ms, lower_max_downtime)
            if decision.refused:
                raise errors.OperationRefused(domain_uuid, "set max downtime", decision.refused)
            if decision.apply:
                self._driver.set_max_downtime(domain_uuid, decision.value_ms)
            current = decision.value_ms
            with self._lock:
                job = self._jobs.setdefault(domain_uuid, _Job(domain_uuid, ours=False))
                job.downtime_floor_ms = decision.value_ms
            applied.append(f"max_downtime_ms={decision.value_ms}")
        previous_bandwidth = None
        if bandwidth_bytes_per_s is not None:
            previous_bandwidth = self._driver.max_speed(domain_uuid)
            self._driver.set_max_speed(domain_uuid, bandwidth_bytes_per_s)
            applied.append(f"bandwidth_bytes_per_s={bandwidth_bytes_per_s}")
        if vcpu_throttle_pct is not None:
            self._driver.set_vcpu_quota(domain_uuid, quota)
            with self._lock:
                self._throttles[domain_uuid] = vcpu_throttle_pct
            applied.append(f"vcpu_throttle_pct={vcpu_throttle_pct}")
        if start_postcopy:
            self._driver.start_postcopy(domain_uuid)
            applied.append("postcopy")
        for change in applied:
            LOG.info("migration tuned vm=%s change=%s", domain_uuid, change)
        return Tuned(applied, current, previous_bandwidth)
