"""Runs rolls: the whole roll planned first, then wave after wave, each host in turn.

Each host of a wave: drained with the roll's per-VM targets (a drain of the executor,
`DrainPolicy.vm_target_hosts`), then the operator's hook (`rollhook`), then a wait until
the host is back (its agent SERVING and reporting its hypervisor and libvirt versions,
its compute service up in the cloud), then re-enabled; the next wave starts when every
host of this one is done. A failed drain, hook or return stops the roll: the host stays
disabled and says why, and the operator resumes the roll (the failed step again) or
skips the host.

Every step is journaled (`rolljournal`) before it is taken; the RPCs' messages are built
from the journal by `rollviews`. A restarted coordinator resumes its open rolls
(`resume_all`, after the executor resumed their drains): a host's drain is adopted,
never started twice; a hook journaled as started but not finished is not run again:
the host fails with that reason and the roll stops for the operator. One thread per roll (`roll/<id8>`), one per running hook (`rollhook/<host>`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from google.protobuf import json_format

from hostmaint.coordinator import errors, rollinputs, rollviews
from hostmaint.coordinator.agents import Health
from hostmaint.coordinator.drivers.base import DriverError
from hostmaint.coordinator.events import EventBus
from hostmaint.coordinator.executor import Executor
from hostmaint.coordinator.rollhook import HookResult, hook_argv, run_hook
from hostmaint.coordinator.rolljournal import (
    OPEN_ROLL_STATES,
    STEP_BACK,
    STEP_DRAIN,
    STEP_ENABLE,
    STEP_HOOK,
    RollHostRow,
    RollHostState,
    RollJournal,
    RollRow,
    RollState,
)
from hostmaint.coordinator.states import DrainState
from hostmaint.protos import coordinator_pb2 as cpb

LOG = logging.getLogger(__name__)

HookRunner = Callable[[list[str], float, dict[str, str]], HookResult]


@dataclass(frozen=True)
class RollSettings:
    hook_dir: str = ""
    hook_timeout_s: float = 3600.0
    back_timeout_s: float = 900.0
    maintenance_s: float = 0.0  # a wave's maintenance, for the prediction
    cpu_allocation_ratio: float = 1.0  # the driver's vCPU counts times this
    poll_interval_s: float = 1.0


@dataclass
class _Run:
    roll_id: str
    request: cpb.RollRequest
    bus: EventBus[cpb.RollEvent] = field(default_factory=EventBus)
    thread: threading.Thread | None = None
    hooks: dict[str, threading.Thread] = field(default_factory=dict)
    waiting_since: dict[str, float] = field(default_factory=dict)
    announced_waves: set[int] = field(default_factory=set)


def _versions(report: object) -> str:
    hv = getattr(report, "hypervisor_version", "")
    lv = getattr(report, "libvirt_version", "")
    return f"hypervisor {hv}, libvirt {lv}" if hv and lv else ""


class Rolls:
    """The coordinator's rolls, over its executor's drains."""

    def __init__(
        self,
        executor: Executor,
        settings: RollSettings,
        *,
        clock: Callable[[], float] = time.time,
        stopped: threading.Event | None = None,
        hook_runner: HookRunner = run_hook,
    ) -> None:
        self.executor = executor
        self.settings = settings
        self.journal = RollJournal(executor.journal)
        self._clock = clock
        self._stopped = stopped or threading.Event()
        self._run_hook = hook_runner
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._wake = threading.Condition()

    # -- planning -------------------------------------------------------------------

    def check(self, request: cpb.RollRequest) -> list[str]:
        """The request's hosts, every field checked; raises before anything changes."""
        if bool(request.hosts) == bool(request.aggregate):
            raise errors.InvalidArgument("hosts", "give hosts or an aggregate, not both or neither")
        if request.hook_timeout_s < 0 or request.back_timeout_s < 0:
            raise errors.InvalidArgument("timeouts", "must not be negative")
        if len(request.policy.vm_target_hosts):
            raise errors.InvalidArgument("policy.vm_target_hosts", "a roll sets the targets")
        self.executor.policy(request.policy)
        if request.hook:
            hook_argv(request.hook, self.settings.hook_dir)
        return rollinputs.roll_hosts(self.executor.driver, request.hosts, request.aggregate)

    def plan(
        self, request: cpb.RollRequest, back: Sequence[str] = ()
    ) -> tuple[cpb.RollPlan, list[str]]:
        """The roll's plan; `back`: hosts disabled now that are back before its first wave."""
        hosts = self.check(request)
        cloud = rollinputs.gather_roll(
            self.executor.driver,
            self.executor.registry,
            hosts,
            self.settings.cpu_allocation_ratio,
            back,
        )
        plan = rollinputs.plan(
            cloud,
            hosts,
            request.max_hosts_per_wave or 1,
            self.settings.maintenance_s,
            self.executor.settings.link_bandwidth_bytes_per_s,
            self.executor.policy(request.policy),
        )
        return rollinputs.plan_to_pb(plan, hosts, self.settings.maintenance_s), hosts

    # -- starting, resuming, cancelling -----------------------------------------------

    def open_roll_of(self, request: cpb.RollRequest) -> str | None:
        """An open roll of the same hosts (or aggregate), to re-attach to."""
        for roll in self.journal.open_rolls():
            other = rollviews.request_from_json(roll.request)
            if request.aggregate:
                if other.aggregate == request.aggregate:
                    return roll.id
            elif not other.aggregate and sorted(other.hosts) == sorted(request.hosts):
                return roll.id
        return None

    def _leading(self) -> None:
        if not self.executor.coordination.is_leader():
            raise errors.NotLeader(self.executor.coordination.member_id)

    def start(self, request: cpb.RollRequest) -> str:
        self._leading()
        plan_pb, hosts = self.plan(request)
        with self._start_lock:  # one roll per host: checked and created together
            return self._create(request, plan_pb, hosts)

    def _create(self, request: cpb.RollRequest, plan_pb: cpb.RollPlan, hosts: list[str]) -> str:
        busy = {h.host for r in self.journal.open_rolls() for h in self.journal.hosts(r.id)}
        for h in hosts:
            if h in busy:
                raise errors.DrainConflict(h, "another roll")
        stored = cpb.RollRequest()
        stored.CopyFrom(request)
        del stored.hosts[:]
        stored.hosts.extend(hosts)
        rows: list[RollHostRow] = []
        for wave in plan_pb.waves:
            for hp in wave.hosts:
                targets = {m.vm_uuid: m.target_host for m in hp.moves}
                rows.append(
                    RollHostRow(
                        roll_id="",
                        host=hp.host,
                        wave=wave.index,
                        position=len(rows),
                        state=RollHostState.PENDING,
                        targets=rollviews.targets_json(targets),
                        predicted_s=hp.predicted_s,
                    )
                )
        roll = self.journal.create_roll(
            rollviews.request_to_json(stored),
            json_format.MessageToJson(plan_pb, sort_keys=True),
            rows,
        )
        run = _Run(roll.id, stored)
        self._publish(run, cpb.ROLL_EVENT_KIND_STARTED, message=request.reason)
        self._publish(run, cpb.ROLL_EVENT_KIND_PLANNED, plan=plan_pb)
        LOG.info(
            "roll started roll=%s hosts=%s waves=%d", roll.id, ",".join(hosts), len(plan_pb.waves)
        )
        self._launch(run)
        return roll.id

    def resume_all(self) -> list[str]:
        """Picks up the rolls a previous coordinator left running (stopped ones wait)."""
        resumed = []
        for roll in self.journal.open_rolls():
            with self._lock:
                if roll.id in self._runs and self._alive(self._runs[roll.id]):
                    continue
            if roll.state == RollState.STOPPED:
                continue
            run = _Run(roll.id, rollviews.request_from_json(roll.request))
            LOG.info("resuming roll roll=%s state=%s", roll.id, roll.state)
            self._publish(run, cpb.ROLL_EVENT_KIND_RESUMED, message="coordinator restarted")
            self._launch(run)
            resumed.append(roll.id)
        return resumed

    def resume(self, roll_id: str, skip_host: str, hook_done: bool) -> None:
        """Goes on with a stopped roll: its failed hosts' steps again, or one skipped.

        The hosts still to drain (and a failed drain's host) are planned again first,
        from the cloud as it is now: a skipped host stays disabled and takes no VM, and
        a failed drain may have moved some of its VMs."""
        self._leading()
        roll = self.journal.roll(roll_id)
        if roll.state != RollState.STOPPED:
            raise errors.PreconditionFailed(f"roll {roll_id}", f"it is {roll.state}, not stopped")
        rows = self.journal.hosts(roll_id)
        failed = [h for h in rows if h.state == RollHostState.FAILED]
        skipped = next((h for h in failed if h.host == skip_host), None)
        if skip_host:
            if skipped is None:
                raise errors.PreconditionFailed(
                    f"skip of {skip_host}", "only a host whose step failed can be skipped"
                )
            retried: list[RollHostRow] = []
            message = f"{skip_host} skipped"
        else:
            retried = failed
            message = "resumed by the operator" + (" (hook done)" if hook_done else "")
        request = rollviews.request_from_json(roll.request)
        again = {h.host for h in retried if h.step == STEP_DRAIN}
        pending = [h.host for h in rows if h.state == RollHostState.PENDING or h.host in again]
        # Planned before anything changes: a roll that no longer fits is refused as it is.
        replanned = self._replan(roll, rows, request, pending, skip_host) if pending else None
        if skipped is not None:
            self.journal.update_host(
                roll_id,
                skip_host,
                state=RollHostState.SKIPPED,
                finished_at=self._clock(),
                error=f"skipped by the operator at its {skipped.step} step ({skipped.error}); "
                "left disabled",
            )
        for h in retried:
            self._retry(roll_id, h, hook_done)
        if replanned is not None:
            plan_pb, updates = replanned
            for host, values in updates.items():
                self.journal.update_host(roll_id, host, **values)
            self.journal.update_roll(
                roll_id, plan=json_format.MessageToJson(plan_pb, sort_keys=True)
            )
        self.journal.update_roll(roll_id, state=RollState.RUNNING, message="")
        run = _Run(roll_id, request)
        self._publish(run, cpb.ROLL_EVENT_KIND_RESUMED, message=message, host=skip_host)
        if skip_host:
            self._publish(run, cpb.ROLL_EVENT_KIND_HOST_SKIPPED, host=skip_host, message=message)
        if replanned is not None:
            self._publish(run, cpb.ROLL_EVENT_KIND_PLANNED, plan=replanned[0])
        self._launch(run)

    def _replan(
        self,
        roll: RollRow,
        rows: Sequence[RollHostRow],
        request: cpb.RollRequest,
        pending: Sequence[str],
        skip: str,
    ) -> tuple[cpb.RollPlan, dict[str, dict[str, object]]]:
        """The plan of the hosts still to drain, after the waves already taken."""
        again = cpb.RollRequest()
        again.CopyFrom(request)
        again.aggregate = ""
        del again.hosts[:]
        again.hosts.extend(pending)
        # The hosts of the waves under way come back before the new waves start.
        back = [
            h.host
            for h in rows
            if h.host not in pending and h.state not in (RollHostState.SKIPPED,)
            and not (h.state == RollHostState.FAILED and h.host == skip)
        ]  # fmt: skip
        fresh, _ = self.plan(again, back)
        old = cpb.RollPlan()
        if roll.plan:
            json_format.Parse(roll.plan, old)
        base = max((h.wave for h in rows if h.host not in pending), default=0)
        merged = cpb.RollPlan()
        merged.CopyFrom(old)
        del merged.waves[:]
        del merged.parked[:]
        merged.waves.extend(w for w in old.waves if w.index <= base)
        merged.parked.extend(p for p in old.parked if p.wave <= base)
        updates: dict[str, dict[str, object]] = {}
        for w in fresh.waves:
            wave = merged.waves.add()
            wave.CopyFrom(w)
            wave.index = base + w.index
            for hp in w.hosts:
                updates[hp.host] = {
                    "wave": wave.index,
                    "targets": rollviews.targets_json({m.vm_uuid: m.target_host for m in hp.moves}),
                    "predicted_s": hp.predicted_s,
                }
        for p in fresh.parked:
            parked = merged.parked.add()
            parked.CopyFrom(p)
            parked.wave = base + p.wave
        merged.predicted_s = sum(w.predicted_s for w in merged.waves)
        return merged, updates

    def _retry(self, roll_id: str, h: RollHostRow, hook_done: bool) -> None:
        if h.step == STEP_DRAIN:
            self.journal.update_host(roll_id, h.host, state=RollHostState.PENDING, error="")
        elif h.step == STEP_HOOK and not hook_done:
            # The operator's decision: the hook runs again.
            self.journal.update_host(
                roll_id,
                h.host,
                state=RollHostState.HOOK_RUNNING,
                error="",
                hook_started_at=None,
                hook_finished_at=None,
                hook_exit_code=None,
            )
        else:
            self.journal.update_host(
                roll_id, h.host, state=RollHostState.WAITING, step=STEP_BACK, error=""
            )

    def cancel(self, roll_id: str, abort_running: bool) -> None:
        self._leading()
        roll = self.journal.roll(roll_id)
        if roll.state not in OPEN_ROLL_STATES:
            raise errors.PreconditionFailed(f"roll {roll_id}", f"it is {roll.state} already")
        self.journal.update_roll(roll_id, cancel_requested=True, abort_running=abort_running)
        if roll.state == RollState.STOPPED:
            self.journal.update_roll(roll_id, state=RollState.CANCELLING)
            self._launch(_Run(roll_id, rollviews.request_from_json(roll.request)))
        self._poke()

    # -- reading ----------------------------------------------------------------------

    def latest(self) -> str:
        roll = self.journal.latest_roll()
        if roll is None:
            raise errors.RollNotFound("yet")
        return roll.id

    def status(self, roll_id: str) -> cpb.RollStatus:
        roll = self.journal.roll(roll_id)
        return rollviews.status_to_pb(roll, self.journal.hosts(roll_id))

    def events(self, roll_id: str, stopped: Callable[[], bool]) -> Iterator[cpb.RollEvent]:
        with self._lock:
            run = self._runs.get(roll_id)
        if run is None:
            status = self.status(roll_id)
            kind = (
                cpb.ROLL_EVENT_KIND_STOPPED
                if status.state == cpb.ROLL_STATE_STOPPED
                else cpb.ROLL_EVENT_KIND_FINISHED
            )
            yield self._event(roll_id, kind, status=status, message=status.message)
            return
        yield from run.bus.follow(lambda: stopped() or self._stopped.is_set())

    def wait(self, roll_id: str, timeout_s: float) -> bool:
        """Until the roll's thread in this process ends (it stopped, or the roll ended)."""
        with self._lock:
            run = self._runs.get(roll_id)
        if run is None or run.thread is None:
            return True
        run.thread.join(timeout_s)
        return not run.thread.is_alive()

    # -- the roll's thread ------------------------------------------------------------

    def _alive(self, run: _Run) -> bool:
        return run.thread is not None and run.thread.is_alive()

    def _launch(self, run: _Run) -> None:
        with self._lock:
            old = self._runs.get(run.roll_id)
            if old is not None:
                run.hooks = old.hooks  # hooks still running stay followed
                old.bus.close()
            self._runs[run.roll_id] = run
        run.thread = threading.Thread(
            target=self._run, args=(run,), name=f"roll/{run.roll_id[:8]}", daemon=True
        )
        run.thread.start()

    def _poke(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def _nap(self) -> None:
        with self._wake:
            self._wake.wait(self.settings.poll_interval_s)

    def _run(self, run: _Run) -> None:
        try:
            while not self._stopped.is_set():
                if not self._tick(run):
                    break
                self._nap()
        except Exception as e:  # thread boundary: a roll never stays running unseen
            LOG.exception("roll crashed roll=%s", run.roll_id)
            if not self._stopped.is_set():
                self.journal.finish_roll(run.roll_id, RollState.FAILED, f"internal error: {e}")
                self._publish(
                    run,
                    cpb.ROLL_EVENT_KIND_FINISHED,
                    message=f"internal error: {e}",
                    status=self.status(run.roll_id),
                )
        finally:
            run.bus.close()

    def _tick(self, run: _Run) -> bool:
        """One look at the roll; False when its thread is done (ended or stopped)."""
        roll = self.journal.roll(run.roll_id)
        hosts = self.journal.hosts(run.roll_id)
        if roll.cancel_requested:
            return self._cancelling(run, roll, hosts)
        if roll.state == RollState.STOPPED:
            return False
        pending = [h for h in hosts if h.state not in rollviews.ENDED]
        if not pending:
            skipped = [h.host for h in hosts if h.state == RollHostState.SKIPPED]
            message = f"skipped: {', '.join(skipped)}" if skipped else ""
            self.journal.finish_roll(run.roll_id, RollState.COMPLETED, message)
            LOG.info("roll completed roll=%s", run.roll_id)
            self._publish(
                run,
                cpb.ROLL_EVENT_KIND_FINISHED,
                message="completed",
                status=self.status(run.roll_id),
            )
            return False
        wave = min(h.wave for h in pending)
        if wave not in run.announced_waves:
            run.announced_waves.add(wave)
            names = [h.host for h in hosts if h.wave == wave]
            self._publish(
                run, cpb.ROLL_EVENT_KIND_WAVE_STARTED, wave=wave, message=", ".join(names)
            )
        for h in hosts:
            if h.wave == wave and h.state not in rollviews.ENDED:
                self._advance(run, h)
        failed = [h for h in self.journal.hosts(run.roll_id) if h.state == RollHostState.FAILED]
        busy = any(t.is_alive() for t in run.hooks.values())
        if failed and not busy:
            why = "; ".join(f"{h.host}: {h.error}" for h in failed)
            self.journal.update_roll(run.roll_id, state=RollState.STOPPED, message=why)
            LOG.warning("roll stopped roll=%s why=%s", run.roll_id, why)
            self._publish(
                run, cpb.ROLL_EVENT_KIND_STOPPED, message=why, status=self.status(run.roll_id)
            )
            return False
        return True

    def _cancelling(self, run: _Run, roll: RollRow, hosts: Sequence[RollHostRow]) -> bool:
        if roll.state != RollState.CANCELLING:
            self.journal.update_roll(run.roll_id, state=RollState.CANCELLING)
        active = False
        for h in hosts:
            if h.state == RollHostState.DRAINING and h.drain_id:
                drain = self.executor.journal.drain(h.drain_id)
                if drain.state.active:
                    active = True
                    if not drain.cancel_requested:
                        self.executor.cancel(h.drain_id, roll.abort_running)
        if active or any(t.is_alive() for t in run.hooks.values()):
            return True  # the drains end, and a running hook is let finish
        self.journal.finish_roll(run.roll_id, RollState.CANCELLED, "cancelled")
        LOG.info("roll cancelled roll=%s", run.roll_id)
        self._publish(
            run, cpb.ROLL_EVENT_KIND_FINISHED, message="cancelled", status=self.status(run.roll_id)
        )
        return False

    # -- one host's steps -------------------------------------------------------------

    def _fail(self, run: _Run, h: RollHostRow, step: str, error: str) -> None:
        LOG.warning(
            "roll host failed roll=%s host=%s step=%s error=%s", run.roll_id, h.host, step, error
        )
        self.journal.update_host(
            run.roll_id, h.host, state=RollHostState.FAILED, step=step, error=error
        )
        self._publish(run, cpb.ROLL_EVENT_KIND_HOST_FAILED, host=h.host, wave=h.wave, message=error)

    def _advance(self, run: _Run, h: RollHostRow) -> None:
        if h.state == RollHostState.PENDING:
            self._drain(run, h)
        elif h.state == RollHostState.DRAINING:
            self._drained(run, h)
        elif h.state == RollHostState.HOOK_RUNNING:
            self._hook(run, h)
        elif h.state == RollHostState.WAITING:
            self._back(run, h)

    def _reason(self, run: _Run) -> str:
        return f"hostmaint roll {run.roll_id}"

    def _drain(self, run: _Run, h: RollHostRow) -> None:
        versions = ""
        try:
            status = self.executor.registry.probe(h.host)
            versions = _versions(status.report)
        except errors.CoordinatorError:
            pass
        h = self.journal.update_host(
            run.roll_id,
            h.host,
            state=RollHostState.DRAINING,
            step=STEP_DRAIN,
            drain_id="",
            started_at=h.started_at or self._clock(),
            versions_before=h.versions_before or versions,
        )
        self._start_drain(run, h)

    def _start_drain(self, run: _Run, h: RollHostRow) -> None:
        policy = cpb.DrainPolicy()
        policy.CopyFrom(run.request.policy)
        for uuid, target in h.vm_targets.items():
            policy.vm_target_hosts[uuid] = target
        try:
            drain_id = self.executor.start_drain(h.host, policy, self._reason(run))
        except errors.CoordinatorError as e:
            self._fail(run, h, STEP_DRAIN, f"the drain could not start: {e}")
            return
        self.journal.update_host(run.roll_id, h.host, drain_id=drain_id)
        self._publish(
            run, cpb.ROLL_EVENT_KIND_DRAIN_STARTED, host=h.host, wave=h.wave, drain_id=drain_id,
            message=f"VMs planned to move: {len(h.vm_targets)}",
        )  # fmt: skip

    def _drained(self, run: _Run, h: RollHostRow) -> None:
        if not h.drain_id:
            # Killed between journaling the step and the drain's id: the drain the roll
            # started then (its reason names the roll) is adopted, not started again.
            latest = self.executor.journal.latest_drain(h.host)
            if (
                latest is not None
                and latest.reason == self._reason(run)
                and latest.created_at >= (h.started_at or 0.0)
            ):
                self.journal.update_host(run.roll_id, h.host, drain_id=latest.id)
                return
            self._start_drain(run, h)
            return
        drain = self.executor.journal.drain(h.drain_id)
        if drain.state.active:
            return
        if drain.state != DrainState.COMPLETED:
            vms = self.executor.journal.vms(h.drain_id)
            left = [f"{v.name}: {v.error or v.state}" for v in vms if v.state != "completed"]
            detail = f" ({'; '.join(left[:5])})" if left else ""
            error = drain.error or f"the drain ended {drain.state}"
            self._fail(run, h, STEP_DRAIN, f"drain {h.drain_id} {drain.state}: {error}{detail}")
            return
        self._publish(
            run, cpb.ROLL_EVENT_KIND_DRAINED, host=h.host, wave=h.wave, drain_id=h.drain_id
        )
        if run.request.hook:
            # The hook's step, not started yet: a restart from here runs it.
            self.journal.update_host(
                run.roll_id, h.host, state=RollHostState.HOOK_RUNNING, step=STEP_HOOK
            )
        else:
            self.journal.update_host(
                run.roll_id, h.host, state=RollHostState.WAITING, step=STEP_BACK
            )

    def _hook(self, run: _Run, h: RollHostRow) -> None:
        if h.hook_started_at is not None:
            if h.host in run.hooks:
                return  # this process runs it, or ran it and its thread journaled the end
            if h.hook_finished_at is None:
                self._fail(
                    run,
                    h,
                    STEP_HOOK,
                    "the hook started at "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(h.hook_started_at))} UTC "
                    "and did not finish before the coordinator stopped; it is not run again "
                    "by itself: check the host, then resume the roll (the hook runs again), "
                    "resume it with the hook done, or skip the host",
                )
            else:
                # Its end was journaled, the next step not: that step follows from it.
                ok = h.hook_exit_code == 0
                self.journal.update_host(
                    run.roll_id,
                    h.host,
                    state=RollHostState.WAITING if ok else RollHostState.FAILED,
                    step=STEP_BACK if ok else STEP_HOOK,
                    error="" if ok else f"the hook exited {h.hook_exit_code}",
                )
            return
        try:
            argv = [*hook_argv(run.request.hook, self.settings.hook_dir), h.host]
        except errors.CoordinatorError as e:
            self._fail(run, h, STEP_HOOK, str(e))
            return
        timeout_s = run.request.hook_timeout_s or self.settings.hook_timeout_s
        # Journaled as started before it runs: a coordinator killed now never runs it again.
        self.journal.update_host(run.roll_id, h.host, hook_started_at=self._clock())
        self._publish(
            run, cpb.ROLL_EVENT_KIND_HOOK_STARTED, host=h.host, wave=h.wave, message=" ".join(argv)
        )
        thread = threading.Thread(
            target=self._hook_thread,
            args=(run, h, argv, timeout_s),
            name=f"rollhook/{h.host}",
            daemon=True,
        )
        run.hooks[h.host] = thread
        thread.start()

    def _hook_thread(self, run: _Run, h: RollHostRow, argv: list[str], timeout_s: float) -> None:
        env = {"HOSTMAINT_ROLL_ID": run.roll_id, "HOSTMAINT_HOST": h.host}
        try:
            result = self._run_hook(argv, timeout_s, env)
        except Exception as e:  # thread boundary: the host must not stay "hook running"
            LOG.exception("hook crashed roll=%s host=%s", run.roll_id, h.host)
            result = HookResult(-1, f"internal error: {e}")
        if self._stopped.is_set():
            return  # the coordinator stops: the hook counts as not finished
        for line in result.output.splitlines()[-20:]:
            LOG.info("hook output roll=%s host=%s: %s", run.roll_id, h.host, line)
        h = self.journal.update_host(
            run.roll_id,
            h.host,
            hook_finished_at=self._clock(),
            hook_exit_code=result.exit_code,
            hook_output=result.output,
        )
        tail = result.output.strip().splitlines()[-1:] if result.output.strip() else []
        if result.ok:
            self.journal.update_host(
                run.roll_id, h.host, state=RollHostState.WAITING, step=STEP_BACK
            )
            self._publish(
                run, cpb.ROLL_EVENT_KIND_HOOK_FINISHED, host=h.host, wave=h.wave,
                message="exit 0" + (f": {tail[0]}" if tail else ""),
            )  # fmt: skip
        else:
            why = (
                f"the hook timed out after {timeout_s:g} s"
                if result.timed_out
                else f"the hook exited {result.exit_code}"
            )
            self._fail(run, h, STEP_HOOK, why + (f": {tail[0]}" if tail else ""))
        self._poke()

    def _back(self, run: _Run, h: RollHostRow) -> None:
        since = run.waiting_since.setdefault(h.host, self._clock())
        missing = self._not_back(h.host)
        if missing:
            timeout_s = run.request.back_timeout_s or self.settings.back_timeout_s
            if self._clock() - since > timeout_s:
                run.waiting_since.pop(h.host, None)
                self._fail(run, h, STEP_BACK, f"not back within {timeout_s:g} s: {missing}")
            return
        run.waiting_since.pop(h.host, None)
        status = self.executor.registry.probe(h.host)
        versions = _versions(status.report)
        h = self.journal.update_host(run.roll_id, h.host, versions_after=versions, step=STEP_ENABLE)
        before = h.versions_before or "?"
        self._publish(
            run, cpb.ROLL_EVENT_KIND_BACK, host=h.host, wave=h.wave,
            message=f"{versions}" + ("" if before == versions else f" (was {before})"),
        )  # fmt: skip
        try:
            self.executor.undrain(h.host)
        except errors.CoordinatorError as e:
            self._fail(run, h, STEP_ENABLE, f"cannot re-enable it: {e}")
            return
        self.journal.update_host(
            run.roll_id, h.host, state=RollHostState.DONE, finished_at=self._clock()
        )
        self._publish(run, cpb.ROLL_EVENT_KIND_ENABLED, host=h.host, wave=h.wave)

    def _not_back(self, host: str) -> str:
        """What the host still lacks to count as back; "" when it is back."""
        try:
            status = self.executor.registry.probe(host)
        except errors.CoordinatorError as e:
            return f"its agent: {e}"
        if status.health != Health.SERVING:
            return f"its agent is {status.health} ({status.error})"
        if not _versions(status.report):
            return "its agent reports no hypervisor and libvirt versions"
        try:
            hosts = {c.name: c for c in self.executor.driver.list_hosts()}
        except DriverError as e:
            return f"the cloud does not answer ({e})"
        compute = hosts.get(host)
        if compute is None or not compute.up:
            return "its compute service is down"
        return ""

    # -- events -----------------------------------------------------------------------

    def _event(
        self, roll_id: str, kind: cpb.RollEventKind.ValueType, **kw: object
    ) -> cpb.RollEvent:
        event = cpb.RollEvent(roll_id=roll_id, kind=kind, **kw)  # type: ignore[arg-type]
        rollviews.set_ts(event, "at", self._clock())
        return event

    def _publish(self, run: _Run, kind: cpb.RollEventKind.ValueType, **kw: object) -> None:
        event = self._event(run.roll_id, kind, **kw)
        LOG.info(
            "roll event roll=%s kind=%s host=%s wave=%s %s",
            run.roll_id,
            cpb.RollEventKind.Name(kind),
            event.host,
            event.wave,
            event.message,
        )
        run.bus.publish(event)
