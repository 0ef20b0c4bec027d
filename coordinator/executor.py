"""Runs drains: disable, gather, plan, then migrate in plan order, watch, escalate, retry.

The `Executor` is the coordinator's API over its drains (the servicer's one
collaborator): it checks and records a drain, holds the host's lock, and starts
the drain's thread; the parts do the rest:

- `drainloop`: the drain's thread (`drain/<host>`): disable, plan, dispatch, finish;
- `livemig`: one live migration's thread (`migwatch/<uuid8>`): start, follow through
  the source agent's WatchMigration (or the cloud's record when the agent cannot
  watch), escalate with the cheapest step the policy allows when it falls behind;
- `links`: a burst (the ladder's hold of the link for one migration's switch-over);
- `coldmig`: the VMs that cannot move live (`nonlive` decides which do);
- `outcomes`: each migration's end in the journal (completed, retried, failed);
- `restart`: a restarted coordinator resumes each drain from the journal without
  starting a migration twice;
- `events`: each drain's event stream; `runtime`: what they share.

Every step goes to the journal as an intent first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from hostmaint.coordinator import errors, views
from hostmaint.coordinator.agents import AgentRegistry
from hostmaint.coordinator.drainloop import DrainLoop
from hostmaint.coordinator.drivers.base import MigrationDriver
from hostmaint.coordinator.events import EventBus
from hostmaint.coordinator.gather import Inputs
from hostmaint.coordinator.ha import Coordination, SingleProcess
from hostmaint.coordinator.journal import Journal
from hostmaint.coordinator.model import DEFAULT_PARAMS, DrainPolicy, ModelParams
from hostmaint.coordinator.planner import DrainPlan
from hostmaint.coordinator.runtime import DrainRun, ExecutorSettings, Runtime, cloud_errors
from hostmaint.coordinator.states import ACTIVE_DRAIN_STATES, FINISHED_DRAIN_STATES, DrainState
from hostmaint.protos import coordinator_pb2 as cpb

__all__ = ["DrainRun", "EventBus", "Executor", "ExecutorSettings"]

LOG = logging.getLogger(__name__)


class Executor:
    def __init__(
        self,
        driver: MigrationDriver,
        registry: AgentRegistry,
        journal: Journal,
        settings: ExecutorSettings,
        *,
        clock: Callable[[], float] = time.time,
        stopped: threading.Event | None = None,
        params: ModelParams = DEFAULT_PARAMS,
        coordination: Coordination | None = None,
    ) -> None:
        self.driver = driver
        # Who leads and who holds each host's drain: one process alone by default.
        if coordination is None:
            alone = SingleProcess()
            alone.start()  # nobody else to elect: the leader from the start
            coordination = alone
        self.coordination: Coordination = coordination
        self.registry = registry
        self.journal = journal
        self.settings = settings
        self._stopped = stopped or threading.Event()
        self.runtime = Runtime(
            driver,
            registry,
            journal,
            settings,
            clock=clock,
            stopped=self._stopped,
            params=params,
        )
        self._loop = DrainLoop(self.runtime, coordination.unlock_host)
        self._lock = threading.Lock()
        self._runs: dict[str, DrainRun] = {}

    # -- planning -------------------------------------------------------------------

    def policy(self, policy_pb: cpb.DrainPolicy) -> DrainPolicy:
        return self.runtime.policy(policy_pb)

    def gather(self, host: str, policy_pb: cpb.DrainPolicy, measure: bool = True) -> Inputs:
        return self.runtime.gather(host, policy_pb, measure)

    def plan(
        self, host: str, policy_pb: cpb.DrainPolicy
    ) -> tuple[cpb.DrainPlan, DrainPlan, Inputs]:
        return self.runtime.plan(host, policy_pb)

    def cold_migration_supported(self) -> bool:
        return self.runtime.cold_migration_supported()

    # -- drains ---------------------------------------------------------------------

    def start_drain(self, host: str, policy_pb: cpb.DrainPolicy, reason: str) -> str:
        """Checks, records and starts a drain; the caller follows its events."""
        self.policy(policy_pb)
        if not self.coordination.is_leader():
            raise errors.NotLeader(self.coordination.member_id)
        latest = self.journal.latest_drain(host)
        if latest is not None and latest.state in ACTIVE_DRAIN_STATES:
            raise errors.DrainConflict(host, latest.id)
        status = self.registry.probe(host)
        if status.health != "SERVING":
            raise errors.PreconditionFailed(
                f"drain of {host}", f"its agent is not serving ({status.health}: {status.error})"
            )
        if not self.coordination.lock_host(host):
            raise errors.DrainConflict(host, "held by another coordinator")
        try:
            drain = self.journal.create_drain(host, views.policy_to_json(policy_pb), reason)
        except BaseException:
            self.coordination.unlock_host(host)
            raise
        self._launch(self.runtime.new_run(drain.id, host, policy_pb))
        return drain.id

    def finished_drain(self, host: str) -> str | None:
        """The drain that emptied this host, while the host stays disabled."""
        latest = self.journal.latest_drain(host)
        if latest is None or latest.state != DrainState.COMPLETED:
            return None
        with cloud_errors():
            enabled = self.driver.host_enabled(host)
        return None if enabled else latest.id

    def resume_all(self) -> list[str]:
        """Picks up the drains a previous coordinator left running."""
        resumed = []
        for drain in self.journal.active_drains():
            with self._lock:
                if drain.id in self._runs:
                    continue
            if not self.coordination.lock_host(drain.host):
                LOG.warning("drain left to its holder drain=%s host=%s", drain.id, drain.host)
                continue
            policy_pb = views.policy_from_json(drain.policy)
            run = self.runtime.new_run(drain.id, drain.host, policy_pb)
            LOG.info("resuming drain drain=%s host=%s state=%s", drain.id, drain.host, drain.state)
            self._launch(run)
            resumed.append(drain.id)
        return resumed

    def left_to_holders(self) -> list[str]:
        """The journal's active drains this coordinator does not run (resume_all left them)."""
        ours = set(self.drain_ids())
        return [d.id for d in self.journal.active_drains() if d.id not in ours]

    def drain_ids(self) -> list[str]:
        """The drains this coordinator has run or runs."""
        with self._lock:
            return list(self._runs)

    def _launch(self, run: DrainRun) -> None:
        with self._lock:
            self._runs[run.drain_id] = run
        run.thread = threading.Thread(
            target=self._loop.run, args=(run,), name=f"drain/{run.host}", daemon=True
        )
        run.thread.start()

    def events(self, drain_id: str, stopped: Callable[[], bool]) -> Iterator[cpb.DrainEvent]:
        with self._lock:
            run = self._runs.get(drain_id)
        if run is None:
            drain = self.journal.drain(drain_id)
            yield self.runtime.events.event(
                drain.id, drain.host, cpb.DRAIN_EVENT_KIND_FINISHED, status=True
            )
            return
        yield from run.bus.follow(lambda: stopped() or self._stopped.is_set())

    def running(self, drain_id: str) -> bool:
        with self._lock:
            run = self._runs.get(drain_id)
        return run is not None and run.thread is not None and run.thread.is_alive()

    def wait(self, drain_id: str, timeout_s: float) -> bool:
        with self._lock:
            run = self._runs.get(drain_id)
        if run is None or run.thread is None:
            return True
        run.thread.join(timeout_s)
        return not run.thread.is_alive()

    def cancel(self, drain_id: str, abort_running: bool) -> None:
        drain = self.journal.drain(drain_id)
        if drain.state in FINISHED_DRAIN_STATES:
            raise errors.PreconditionFailed(f"drain {drain_id}", f"it is {drain.state} already")
        self.journal.request_cancel(drain_id, abort_running)
        self.runtime.poke()

    def status(self, drain_id: str) -> cpb.DrainStatus:
        return self.runtime.events.status(drain_id)

    def undrain(self, host: str) -> None:
        latest = self.journal.latest_drain(host)
        if latest is not None and latest.state not in FINISHED_DRAIN_STATES:
            raise errors.PreconditionFailed(
                f"undrain of {host}", f"drain {latest.id} is {latest.state}; cancel it first"
            )
        with cloud_errors(host):
            self.driver.enable_host(host)
