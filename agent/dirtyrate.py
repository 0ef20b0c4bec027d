"""Dirty-page-rate measurement: on demand, and on a staggered background schedule.

libvirt measures inside QEMU (`startDirtyRateCalc`, then the dirtyrate domain
stats). A measurement blocks for its window, so the background loop measures
a few domains at a time and spreads a host's domains over the interval.

The background loop measures each batch over windows that double (half the
window, the window, then longer ones up to ``max_window_s`` for the domains whose
working set the shorter ones did not find: ``common.dirty``), and keeps the latest
reading over each window per domain. ListDomains returns them with their times, so
a coordinator can plan on them without waiting for a measurement.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hostmaint.agent import errors
from hostmaint.agent.libvirt_driver import DIRTY_RATE_MEASURING, LibvirtDriver
from hostmaint.agent.types import DirtyRate, DirtyRateMethod, DomainState
from hostmaint.common import dirty

LOG = logging.getLogger(__name__)
MIN_WINDOW_S = 1
MAX_WINDOW_S = 60
_POLL_S = 0.2


@dataclass(frozen=True)
class Schedule:
    interval_s: float
    window_s: int
    batch_size: int
    method: DirtyRateMethod | None  # None: the best each domain supports
    max_window_s: int = 0  # longest doubled window; not above window_s: the window alone

    @property
    def first_windows_s(self) -> tuple[int, ...]:
        """Measured for every domain: half the window (when whole), then the window."""
        half = self.window_s // 2
        return (half, self.window_s) if half >= MIN_WINDOW_S else (self.window_s,)


def validate_window(window_s: float) -> int:
    """libvirt measures whole seconds, 1 to 60."""
    if window_s != int(window_s) or not MIN_WINDOW_S <= window_s <= MAX_WINDOW_S:
        raise errors.InvalidArgument(
            "window_s", f"must be a whole number of seconds from {MIN_WINDOW_S} to {MAX_WINDOW_S}"
        )
    return int(window_s)


class DirtyRateMeter:
    """Measures and caches dirty rates; the cache feeds ListDomains."""

    def __init__(
        self,
        driver: LibvirtDriver,
        *,
        wait: Callable[[float], bool],
        clock: Callable[[], float],
    ) -> None:
        self._driver = driver
        self._wait = wait
        self._clock = clock
        self._lock = threading.Condition()
        self._cache: dict[str, DirtyRate] = {}
        # The latest reading over each window, by domain.
        self._series: dict[str, dict[int, DirtyRate]] = {}
        # QEMU runs one measurement per domain at a time: later callers wait their turn.
        self._busy: set[str] = set()
        # Domains where dirty-bitmap failed: page-sampling is their best.
        self._no_bitmap: set[str] = set()

    def last(self, domain_uuid: str) -> DirtyRate | None:
        with self._lock:
            return self._cache.get(domain_uuid)

    def series(self, domain_uuid: str) -> tuple[DirtyRate, ...]:
        """The latest reading over each window, shortest window first."""
        with self._lock:
            by_window = self._series.get(domain_uuid, {})
            return tuple(by_window[w] for w in sorted(by_window))

    def forget(self, domain_uuid: str) -> None:
        with self._lock:
            self._cache.pop(domain_uuid, None)
            self._series.pop(domain_uuid, None)

    def best_method(self, domain_uuid: str, dirty_ring: bool) -> DirtyRateMethod:
        if dirty_ring:
            return DirtyRateMethod.DIRTY_RING
        with self._lock:
            if domain_uuid in self._no_bitmap:
                return DirtyRateMethod.PAGE_SAMPLING
        return DirtyRateMethod.DIRTY_BITMAP

    def measure(
        self, domain_uuids: Sequence[str], window_s: int, method: DirtyRateMethod | None
    ) -> dict[str, DirtyRate]:
        """Measures the domains at once over one window. Blocks for about window_s.

        With method None each domain gets the best method it supports, and a
        domain whose QEMU refuses dirty-bitmap falls back to page-sampling.
        """
        wanted = list(dict.fromkeys(domain_uuids))
        deadline = self._clock() + MAX_WINDOW_S * 2
        with self._lock:
            while self._busy.intersection(wanted):
                if self._clock() > deadline:
                    raise errors.OperationRefused(
                        ",".join(wanted), "measure dirty rate", "another measurement is running"
                    )
                self._lock.wait(_POLL_S)
            self._busy.update(wanted)
        try:
            return self._measure(wanted, window_s, method)
        finally:
            with self._lock:
                self._busy.difference_update(wanted)
                self._lock.notify_all()

    def _measure(
        self, domain_uuids: Sequence[str], window_s: int, method: DirtyRateMethod | None
    ) -> dict[str, DirtyRate]:
        chosen_for: dict[str, DirtyRateMethod] = {}
        for uuid in domain_uuids:  # all checked before any starts
            chosen = method
            if chosen is None:
                raw = self._driver.domain(uuid)
                if raw.state is not DomainState.RUNNING:
                    raise errors.OperationRefused(uuid, "measure dirty rate", "domain not running")
                chosen = self.best_method(uuid, raw.config.dirty_ring)
            chosen_for[uuid] = chosen
        started: list[str] = []
        try:
            for uuid, chosen in chosen_for.items():
                self._start(uuid, window_s, chosen, method)
                started.append(uuid)
        except Exception:
            # QEMU measures what it started whatever happens here: those domains stay
            # busy until their window is over, or the next measurement of one is refused
            # ("the dirty rate is already being measured")
            if started:
                self._wait(float(window_s) + _POLL_S)
            raise
        if not started:
            return {}
        deadline = self._clock() + window_s + max(5.0, window_s)
        if self._wait(float(window_s)):
            return {}  # shutting down
        results: dict[str, DirtyRate] = {}
        pending = list(started)
        while pending:
            for reading in self._driver.dirty_rates(pending):
                if reading.rate is not None:
                    results[reading.domain_uuid] = reading.rate
                elif reading.status != DIRTY_RATE_MEASURING:
                    raise errors.HypervisorError(
                        "dirty-rate", reading.status, f"measurement of {reading.domain_uuid} lost"
                    )
            pending = [u for u in pending if u not in results]
            if not pending:
                break
            if self._clock() > deadline:
                raise errors.HypervisorError(
                    "dirty-rate", 0, "measurement did not finish: " + ", ".join(pending)
                )
            if self._wait(_POLL_S):
                return results
        with self._lock:
            self._cache.update(results)
            for uuid, rate in results.items():
                self._series.setdefault(uuid, {})[int(rate.window_s)] = rate
        return results

    def _start(
        self,
        uuid: str,
        window_s: int,
        chosen: DirtyRateMethod,
        method: DirtyRateMethod | None,
    ) -> None:
        try:
            self._driver.start_dirty_rate(uuid, window_s, chosen)
        except errors.OperationRefused:
            # QEMU refused this mode for this domain (the API itself works).
            if method is not None or chosen is DirtyRateMethod.PAGE_SAMPLING:
                raise
            LOG.info("dirty-bitmap refused, using page-sampling vm=%s", uuid)
            with self._lock:
                self._no_bitmap.add(uuid)
            self._driver.start_dirty_rate(uuid, window_s, DirtyRateMethod.PAGE_SAMPLING)

    def measure_series(self, batch: Sequence[str], schedule: Schedule) -> None:
        """One batch over the schedule's windows; longer ones while they can tell more."""
        readings: dict[str, list[dirty.Reading]] = {u: [] for u in batch}
        for window_s in schedule.first_windows_s:
            found = self.measure(batch, window_s, schedule.method)
            for uuid, rate in found.items():
                readings[uuid].append(dirty.Reading(rate.bytes_per_s, window_s))
        nonzero: dict[str, float] = {}  # read once a batch: a domain lookup each
        while True:
            wanted: dict[int, list[str]] = {}
            for uuid, rs in readings.items():
                if len(rs) < 2:
                    continue
                if uuid not in nonzero:
                    nonzero[uuid] = self._nonzero_bytes(uuid)
                window = dirty.next_window_s(rs, nonzero[uuid], schedule.max_window_s)
                if window is not None:
                    wanted.setdefault(int(window), []).append(uuid)
            if not wanted:
                return
            window_s = min(wanted)
            found = self.measure(wanted[window_s], window_s, schedule.method)
            for uuid in wanted[window_s]:
                if uuid in found:
                    readings[uuid].append(dirty.Reading(found[uuid].bytes_per_s, window_s))
                else:
                    readings.pop(uuid)  # not measured: its series ends here

    def _nonzero_bytes(self, domain_uuid: str) -> float:
        """The guest memory a window could find written: resident, at most its size."""
        try:
            raw = self._driver.domain(domain_uuid)
        except errors.AgentError:
            return 0.0
        size = raw.config.memory_max_bytes
        return float(min(raw.rss_bytes or size, size))

    def run_schedule(self, schedule: Schedule, stopped: threading.Event) -> None:
        """The background loop: every interval, every running domain, in batches."""
        while not stopped.is_set():
            cycle_start = self._clock()
            try:
                running = [
                    d.config.uuid
                    for d in self._driver.list_domains()
                    if d.state is DomainState.RUNNING and not d.migrating
                ]
            except errors.AgentError as e:
                LOG.warning("dirty-rate schedule cannot list domains error=%s", e)
                running = []
            for start in range(0, len(running), schedule.batch_size):
                if stopped.is_set():
                    return
                batch = running[start : start + schedule.batch_size]
                try:
                    self.measure_series(batch, schedule)
                except errors.AgentError as e:
                    LOG.warning("dirty-rate batch failed vms=%s error=%s", ",".join(batch), e)
                except Exception:  # loop boundary: the schedule must survive
                    LOG.exception("dirty-rate batch crashed vms=%s", ",".join(batch))
            remaining = schedule.interval_s - (self._clock() - cycle_start)
            if self._wait(max(1.0, remaining)):
                return
