"""Discrete-event simulator of a whole host drain (pure, deterministic for a seed).

Public API
----------
``simulate(vms, strategy, link, params=DEFAULT_PARAMS, seed=0, policy=None) -> SimResult``
    runs every VM's migration with the physics of ``convergence.Migration``; concurrent
    migrations share the link max-min fairly (each capped by its own max bandwidth and
    the link's per-stream cap). Events: a migration's own events (setup done, bitmap
    sync, switch-over done, post-copy done), the strategy's control timers (downtime
    steps, timeouts, watchdogs) and starts. ``vms`` are the *true* VMs.
``Strategy`` (Protocol) decides what to start and how to steer running migrations:
    ``next_jobs(now_s, running)``, ``next_control_s(mig)``, ``control(mig, now_s)``,
    ``remaining()``; optionally ``next_start_s()``, when it will next have a job to start
    while it has none now (a delayed start; the simulator waits for it).
``Job`` a migration to start: VM, ``Settings``, target host name or None.
``VmResult`` / ``SimResult``: per-VM outcome, start/end, downtime, rounds, bytes,
    post-copy use, downtime cap exceeded;
    makespan and the bytes the link carried
    (``link_bytes``, equal to the sum of the VMs' bytes: bytes are conserved);
    ``event_cap_hit``: the run took ``max_events`` steps without ending, so what still ran
    was aborted and the drain counts as failed (``failed`` > 0).
``MAX_EVENTS``, ``MIN_STEP_S``: the step cap (``simulate(..., max_events=)``) and the
    shortest non-zero step, so a run always ends. ``SETUP_JITTER``: set-up times vary by
    this share around ``params.setup_s``.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from hostmaint.coordinator.convergence import Migration
from hostmaint.coordinator.model import (
    DEFAULT_PARAMS,
    DrainPolicy,
    Link,
    ModelParams,
    Outcome,
    Settings,
    VmSpec,
)

LOG = logging.getLogger(__name__)

MAX_EVENTS = 2_000_000  # a drain that needs more steps than this is stuck: it fails
MIN_STEP_S = 1e-6  # a step that is not zero is at least this long (no creeping towards a limit)
SETUP_JITTER = 0.2  # each migration's set-up takes params.setup_s times 1 +- this (seeded)


@dataclass(frozen=True)
class Job:
    vm: VmSpec
    settings: Settings
    target: str | None = None


class Strategy(Protocol):
    name: str

    def next_jobs(self, now_s: float, running: Sequence[Migration]) -> list[Job]: ...

    def next_control_s(self, mig: Migration) -> float: ...

    def control(self, mig: Migration, now_s: float) -> None: ...

    def remaining(self) -> int: ...


@dataclass(frozen=True)
class VmResult:
    uuid: str
    target: str | None
    start_s: float
    end_s: float
    outcome: Outcome
    downtime_ms: float
    rounds: int
    bytes_sent: float
    postcopy: bool
    over_downtime: bool
    final_throttle_pct: float


@dataclass(frozen=True)
class SimResult:
    strategy: str
    vms: tuple[VmResult, ...]
    makespan_s: float
    link_bytes: float
    never_started: tuple[str, ...]
    event_cap_hit: bool = False

    @property
    def failed(self) -> int:
        return sum(1 for v in self.vms if v.outcome is not Outcome.COMPLETED) + len(
            self.never_started
        )

    @property
    def over_downtime(self) -> int:
        return sum(1 for v in self.vms if v.over_downtime)

    @property
    def postcopy_count(self) -> int:
        return sum(1 for v in self.vms if v.postcopy)


def share_bandwidth(total: float, caps: Sequence[float]) -> list[float]:
    """Max-min fair shares of ``total`` among flows with the given caps (water-filling)."""
    n = len(caps)
    shares = [0.0] * n
    order = sorted(range(n), key=lambda i: caps[i])
    left = total
    for pos, i in enumerate(order):
        fair = left / (n - pos)
        shares[i] = min(caps[i], fair)
        left -= shares[i]
    return shares


def simulate(
    vms: Sequence[VmSpec],
    strategy: Strategy,
    link: Link,
    params: ModelParams = DEFAULT_PARAMS,
    seed: int = 0,
    policy: DrainPolicy | None = None,
    max_events: int = MAX_EVENTS,
) -> SimResult:
    rng = random.Random(seed)
    caps_ms = {v.uuid: (policy or DrainPolicy()).downtime_cap_ms(v.max_downtime_ms) for v in vms}
    total_bw = link.bandwidth_bytes_per_s * params.link_efficiency
    stream_cap = link.max_stream_bytes_per_s or math.inf
    now = 0.0
    running: list[Migration] = []
    targets: dict[int, str | None] = {}
    done: list[VmResult] = []
    link_bytes = 0.0
    capped = True
    for _ in range(max(1, max_events)):
        for job in strategy.next_jobs(now, running):
            setup = params.setup_s * rng.uniform(1.0 - SETUP_JITTER, 1.0 + SETUP_JITTER)
            mig = Migration(job.vm, job.settings, params, start_s=now, setup_s=setup)
            targets[id(mig)] = job.target
            running.append(mig)
        next_start = _next_start_s(strategy)
        if not running:
            if next_start > now and math.isfinite(next_start):
                now = next_start
                continue
            capped = False
            break
        active = [m for m in running if m.wants_bandwidth()]
        caps = [min(stream_cap, m.bandwidth_cap or math.inf) for m in active]
        bw = dict(zip((id(m) for m in active), share_bandwidth(total_bw, caps), strict=True))
        dt = math.inf
        for m in running:
            dt = min(dt, m.time_to_event(bw.get(id(m), 0.0)), strategy.next_control_s(m) - now)
        if next_start > now:
            dt = min(dt, next_start - now)
        if math.isinf(dt):
            for m in running:  # nothing can move any more: give up on what is left
                m.abort()
            dt = 0.0
        dt = max(dt, 0.0)
        if 0.0 < dt < MIN_STEP_S:
            dt = MIN_STEP_S
        for m in running:
            before = m.bytes_sent
            m.advance(dt, bw.get(id(m), 0.0))
            link_bytes += m.bytes_sent - before
        now += dt
        for m in running:
            b = bw.get(id(m), 0.0)
            if m.time_to_event(b) <= 1e-9:
                m.fire(b)
            if not m.finished and strategy.next_control_s(m) <= now + 1e-9:
                strategy.control(m, now)
        for m in [m for m in running if m.finished]:
            running.remove(m)
            done.append(_result(m, targets.pop(id(m)), caps_ms[m.vm.uuid]))
    if capped:
        LOG.warning(
            "drain simulation hit its step cap strategy=%s steps=%d", strategy.name, max_events
        )
        for m in running:  # stuck: what still runs is given up, and the drain has failed
            m.abort()
            m.outcome = Outcome.ABORTED
            m.end_s = m.now_s
            done.append(_result(m, targets.pop(id(m)), caps_ms[m.vm.uuid]))
    makespan = max((r.end_s for r in done), default=0.0)
    started = {r.uuid for r in done}
    never = tuple(v.uuid for v in vms if v.uuid not in started)
    return SimResult(strategy.name, tuple(done), makespan, link_bytes, never, capped)


def _next_start_s(strategy: Strategy) -> float:
    hook = getattr(strategy, "next_start_s", None)
    if hook is None or strategy.remaining() == 0:
        return math.inf
    value = hook()
    return float(value) if isinstance(value, (int, float)) else math.inf


def _result(m: Migration, target: str | None, cap_ms: float) -> VmResult:
    downtime_ms = m.downtime_s * 1000.0
    ok = m.outcome is Outcome.COMPLETED
    return VmResult(
        uuid=m.vm.uuid,
        target=target,
        start_s=m.start_s,
        end_s=m.end_s if m.end_s is not None else m.now_s,
        outcome=m.outcome,
        downtime_ms=downtime_ms,
        rounds=m.rounds,
        bytes_sent=m.bytes_sent,
        postcopy=m.postcopy,
        over_downtime=ok and downtime_ms > cap_ms + 1e-6,
        final_throttle_pct=m.throttle_pct,
    )
