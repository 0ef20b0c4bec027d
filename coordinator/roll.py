"""Rolling maintenance of a whole cloud, planned before anything moves (pure: no I/O, no clock).

Public API
----------
Values (frozen dataclasses, units in names; in ``rolltypes``):
  ``RollHost``     a compute host: memory capacity (and what it reports in use, whose part
                   beyond its VMs' memory stays when they leave), physical CPUs and the
                   vCPU allocation ratio, its VMs (``model.VmSpec``: memory, vCPUs, server
                   groups, and what the per-host drain prediction needs).
  ``RollPolicy``   hosts drained at once (``max_hosts_per_wave``), the time one wave's
                   maintenance takes after its drain (``maintenance_s``).
  ``DrainEstimate`` a host drain's predicted time and bytes sent.
  ``RollMove``     one migration of the roll: VM, source, target, wave, the VM's n-th move.
  ``Parked``       a VM placed on a host still to be drained (so it moves again), and why.
  ``HostDrain``, ``Wave``, ``RollPlan``: the plan; ``RollAudit`` a plan replayed.
``DrainPredictor``: ``(host, [(vm, target), ...]) -> DrainEstimate``, one host's drain
  predicted; the roll does not model migrations itself (``rollpredict`` builds predictors
  on the drain planner or the convergence model).
``plan_roll(hosts, policy, predict) -> RollPlan``: hostmaint's roll.
``naive_roll(hosts, predict, maintenance_s=0.0) -> RollPlan``: today's roll, for
  comparison: host after host in name order, each VM (with its hard-affinity group) to
  the least-filled host that is not being drained, as a scheduler picks, ignoring
  future drains.
``rollaudit.replay_roll(hosts, plan) -> RollAudit``: the plan replayed wave by wave from the
  hosts as given: the fullest any host gets, and every rule broken.
``RollInfeasible``: no roll keeps the rules (its ``host``, ``vm_uuid`` and ``reason``).
The state a roll is planned on (where each VM is, what a host refuses): ``rollcloud``.

The roll
--------
Every VM of a host must leave it before the host is patched, and every host is patched,
so every VM moves at least once; it moves exactly once if it goes to a host already
done (drained, patched and back in service). Only the first host drained cannot do
that when no host is empty: no host is done yet, so its VMs wait on a host patched
later (they are *parked*) and move twice; unless capacity or server groups run out
later, every other VM moves once.

Waves, greedily, one after the other, every VM placed before any drain is predicted:

1. The hosts still to drain are taken in order of the most free memory first (each host
   drained adds its free memory to the done hosts, where the next waves' VMs go), then
   the least memory used, then by name. A host joins the wave when all its VMs fit on
   done hosts beside the VMs placed there so far (memory; vCPUs at the ratio; no member
   of a VM's hard anti-affinity group there; a hard-affinity group moves whole, to one
   host), until the wave has ``max_hosts_per_wave`` hosts. An empty host always fits.
   A host's VMs are placed the most constrained first (hard groups), then the largest;
   each goes to the done host with the fewest soft-rule conflicts (members of its soft
   anti-affinity groups there, soft-affinity groups not there), then the least filled
   after the move: spreading puts the migrations of one drain on several targets (a
   drain runs only so many at once per target) and keeps the fill low.
2. If no host fits (the first wave when no host is empty; later, when capacity or hard
   groups run out), the wave drains one host: the one that parks the fewest VMs (then
   the least memory; hosts tried in order of the fewest VMs, the least memory, name).
   Its VMs go to done hosts where they fit, as above; the rest are parked on hosts
   still to drain, best fit (the least free memory left after the move: few hosts fill
   up and, fullest, come last). Each parked VM is reported with the reason.
3. A greedy choice can leave a later VM nowhere to go though some roll exists: the
   waves are then placed again with other rankings of the targets (best fit on done
   hosts too, which keeps room for a large VM; then spreading parked VMs as well), and
   ``RollInfeasible`` names the first ranking's stuck VM if none finds a roll.
4. Every host of every wave is predicted with ``predict`` (its VMs and their targets);
   a wave lasts its longest host drain plus ``maintenance_s``, the roll the sum of its
   waves. A wave's drains are taken as independent: each source has its own link, and
   targets receiving from several sources at once are not slowed.

Once one host is done and the hosts have the same capacity (and no memory kept beyond
their VMs), the next host always fits whole on the host drained just before it
(nothing was placed there yet), so after the first wave every host drains onto done
hosts only, and the roll ends with its last wave's hosts empty. A wave leaves every
host within its capacity: a host either sends (drained) or receives (done, or parking
in step 2) during a wave, never both, so the end of each wave is its fullest point.
Not decided here: whether a VM can live-migrate at all (blockers, a workload that never
converges: the per-host drain plan says) and CPU compatibility between hosts (the roll
takes the hosts it is given as one pool).

Worked example (64 GiB hosts, vCPUs plenty, ``max_hosts_per_wave=2``; VMs in GiB)::

    host:   a: 16 16 8    b: 32 8    c: 8    d: 16 8    e: 8 8
    free:   24            24         56      40         48

* wave 1: no host is done and none is empty. ``c`` drains first: one VM, the fewest
  that must wait. Its 8 GiB are parked on ``a`` (best fit: ``a`` and ``b`` have the
  least room, 24 GiB; by name), which then has the least room and comes last.
* wave 2: done ``c`` (64 GiB free). In order of free memory: ``e`` (48) and ``d`` (40);
  e's 16 GiB and d's 24 GiB fit on ``c`` together, and the wave is full.
* wave 3: done ``c`` (24 free), ``d`` and ``e`` (64 free each): ``b`` (40 used) and
  ``a`` (48 used: its own 40 and c's parked VM) both fit; their VMs spread over ``d``
  and ``e``, each to the host least filled after the move (``c``, 40 of 64 GiB, would
  be fuller).

Ten VMs, eleven moves (1.1 per VM): c's VM moves twice, every other VM once. With a
predictor that takes 1 s per GiB sent, the waves take 8, 24 and 48 s: 80 s. The naive
roll (a, b, c, d, e; least filled first) makes 14 moves: a's VMs go to ``c`` and ``e``,
then on again when those drain; host after host, 176 s.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from hostmaint.coordinator.model import VmSpec
from hostmaint.coordinator.rollcloud import Cloud, Unit
from hostmaint.coordinator.rolltypes import (
    DrainEstimate,
    DrainPredictor,
    HostDrain,
    Parked,
    RollHost,
    RollInfeasible,
    RollMove,
    RollPlan,
    RollPolicy,
    Wave,
)

NO_HOST_DONE_REASON = "no host is done yet: it waits on a host drained later"
SCHEDULER_REASON = "the scheduler does not know its target is drained later"


def _choose(
    cloud: Cloud,
    unit: Unit,
    candidates: Iterable[str],
    key: Callable[[str], tuple[float | str, ...]],
    refused: Counter[str],
) -> str | None:
    """The candidate with the lowest ``key`` that can take the unit; refusals counted."""
    best: str | None = None
    best_key: tuple[float | str, ...] | None = None
    for host in candidates:
        why = cloud.refusal(unit, host)
        if why is not None:
            refused[why] += 1
            continue
        k = key(host)
        if best_key is None or k < best_key:
            best, best_key = host, k
    return best


def _spread_key(cloud: Cloud, unit: Unit) -> Callable[[str], tuple[float | str, ...]]:
    """Done hosts: the fewest soft conflicts, then the least filled after the move."""
    return lambda h: (
        cloud.soft_conflicts(unit, h),
        cloud.memory_fill(h, unit.memory_bytes),
        cloud.vcpu_fill(h, unit.vcpus),
        h,
    )


def _best_fit_key(cloud: Cloud, unit: Unit) -> Callable[[str], tuple[float | str, ...]]:
    """Parking: the fewest soft conflicts, then the least free memory left (best fit)."""
    return lambda h: (
        cloud.soft_conflicts(unit, h),
        cloud.free_memory(h) - unit.memory_bytes,
        h,
    )


@dataclass(frozen=True)
class _Keys:
    """How targets are ranked: on done hosts, and when parked on hosts still to drain."""

    done: Callable[[Cloud, Unit], Callable[[str], tuple[float | str, ...]]]
    parking: Callable[[Cloud, Unit], Callable[[str], tuple[float | str, ...]]]


# tried in turn until one finds a roll: spreading onto done hosts and parking best fit;
# packing both (keeps room for a large VM later); spreading both
_KEYS = (
    _Keys(_spread_key, _best_fit_key),
    _Keys(_best_fit_key, _best_fit_key),
    _Keys(_spread_key, _spread_key),
)


def _least_filled_key(cloud: Cloud) -> Callable[[str], tuple[float | str, ...]]:
    """The scheduler's weigher: the least filled (memory) now."""
    return lambda h: (cloud.memory_fill(h), h)


def _why(refused: Counter[str], hosts: int) -> str:
    parts = ", ".join(f"{why} on {n}" for why, n in sorted(refused.items()))
    return f"no host already done has room ({parts} of {hosts})"


# one unit's move while a wave is planned: unit, source, target, and the reason when parked
_Placed = tuple[Unit, str, str, str | None]


def _undo(cloud: Cloud, placed: Sequence[_Placed]) -> None:
    for unit, source, target, _ in reversed(placed):
        cloud.move(unit, target, source)


def _onto_done(cloud: Cloud, host: str, done: Sequence[str], keys: _Keys) -> list[_Placed] | None:
    """Every unit of ``host`` onto done hosts (applied), or None (nothing applied)."""
    placed: list[_Placed] = []
    for unit in cloud.units(host):
        target = _choose(cloud, unit, done, keys.done(cloud, unit), Counter())
        if target is None:
            _undo(cloud, placed)
            return None
        cloud.move(unit, host, target)
        placed.append((unit, host, target, None))
    return placed


def _with_parking(
    cloud: Cloud, host: str, done: Sequence[str], pending: Sequence[str], keys: _Keys
) -> list[_Placed] | RollInfeasible:
    """The units of ``host`` onto done hosts where they fit, the rest parked on hosts still
    to drain (applied); or why one fits nowhere (nothing applied)."""
    placed: list[_Placed] = []
    others = [h for h in pending if h != host]
    for unit in cloud.units(host):
        refused: Counter[str] = Counter()
        target = _choose(cloud, unit, done, keys.done(cloud, unit), refused)
        reason = None
        if target is None:
            reason = _why(refused, len(done)) if done else NO_HOST_DONE_REASON
            target = _choose(cloud, unit, others, keys.parking(cloud, unit), refused)
        if target is None:
            _undo(cloud, placed)
            parts = ", ".join(f"{why} on {n}" for why, n in sorted(refused.items()))
            return RollInfeasible(host, unit.vms[0].uuid, f"refused for {parts}")
        cloud.move(unit, host, target)
        placed.append((unit, host, target, reason))
    return placed


def _parked(placed: Sequence[_Placed]) -> tuple[int, int]:
    """VMs and memory parked (moving twice)."""
    units = [u for u, _, _, why in placed if why is not None]
    return sum(len(u.vms) for u in units), sum(u.memory_bytes for u in units)


def _fallback(
    cloud: Cloud, done: Sequence[str], pending: Sequence[str], keys: _Keys
) -> tuple[str, list[_Placed]]:
    """The one host to drain when none fits on done hosts: the fewest VMs parked (each is
    one more migration, one more pause of the guest), then the least memory."""
    order = sorted(pending, key=lambda h: (len(cloud.vms[h]), cloud.vm_memory(h), h))
    best: tuple[tuple[int, int], str] | None = None
    first_error: RollInfeasible | None = None
    for host in order:
        if best is not None and len(cloud.vms[host]) > best[0][0]:
            break  # it cannot park fewer
        placed = _with_parking(cloud, host, done, pending, keys)
        if isinstance(placed, RollInfeasible):
            first_error = first_error or placed
            continue
        parked = _parked(placed)
        _undo(cloud, placed)
        if best is None or parked < best[0]:
            best = (parked, host)
    if best is None:
        assert first_error is not None
        raise first_error
    placed = _with_parking(cloud, best[1], done, pending, keys)
    assert not isinstance(placed, RollInfeasible)
    return best[1], placed


def _drain_order_key(cloud: Cloud, host: str) -> tuple[int, int, str]:
    return (-cloud.free_memory(host), cloud.vm_memory(host), host)


class _Recorder:
    """Turns placed units into moves and waves; the drains are predicted at the end."""

    def __init__(self, cloud: Cloud) -> None:
        self.cloud = cloud
        self.start_peaks = cloud.fill_peaks()
        # per wave: its hosts, each host's moves and (VM, target) pairs, the fill peaks
        self.waves: list[
            tuple[
                list[str],
                dict[str, list[RollMove]],
                dict[str, list[tuple[VmSpec, str]]],
                tuple[float, float],
            ]
        ] = []
        self.parked: list[Parked] = []

    def wave(self, hosts: Sequence[str], placed: Sequence[_Placed]) -> None:
        index = len(self.waves) + 1
        by_host: dict[str, list[RollMove]] = {h: [] for h in hosts}
        pairs: dict[str, list[tuple[VmSpec, str]]] = {h: [] for h in hosts}
        for unit, source, target, reason in placed:
            for vm in unit.vms:
                self.cloud.moves[vm.uuid] += 1
                nth = self.cloud.moves[vm.uuid]
                by_host[source].append(RollMove(vm.uuid, vm.name, source, target, index, nth))
                pairs[source].append((vm, target))
                if reason is not None:
                    self.parked.append(Parked(vm.uuid, vm.name, index, source, target, reason))
        self.waves.append((list(hosts), by_host, pairs, self.cloud.fill_peaks()))

    def plan(self, strategy: str, predict: DrainPredictor, maintenance_s: float) -> RollPlan:
        waves = []
        for index, (hosts, by_host, pairs, (mem_peak, cpu_peak)) in enumerate(self.waves, 1):
            drains = []
            for h in hosts:
                est = predict(h, pairs[h]) if pairs[h] else DrainEstimate(0.0, 0.0)
                drains.append(HostDrain(h, tuple(by_host[h]), est.time_s, est.bytes_sent))
            drain_s = max((d.predicted_s for d in drains), default=0.0)
            waves.append(
                Wave(index, tuple(drains), drain_s, drain_s + maintenance_s, mem_peak, cpu_peak)
            )
        cloud = self.cloud
        placement = sorted((u, h) for h in cloud.names for u in cloud.vms[h])
        return RollPlan(
            strategy=strategy,
            waves=tuple(waves),
            parked=tuple(self.parked),
            vm_count=len(placement),
            placement=tuple(placement),
            memory_fill_peak=max([self.start_peaks[0], *(w.memory_fill_peak for w in waves)]),
            vcpu_fill_peak=max([self.start_peaks[1], *(w.vcpu_fill_peak for w in waves)]),
        )


def plan_roll(hosts: Sequence[RollHost], policy: RollPolicy, predict: DrainPredictor) -> RollPlan:
    """hostmaint's roll of ``hosts`` (see the module's docstring): the waves are placed
    with each ranking of targets in turn (``_KEYS``) until one finds a roll, then each
    host's drain is predicted. Raises the first ranking's ``RollInfeasible`` if none
    does."""
    if policy.max_hosts_per_wave < 1:
        raise ValueError("max_hosts_per_wave must be at least 1")
    errors: list[RollInfeasible] = []
    for keys in _KEYS:
        try:
            rec = _place_waves(hosts, policy.max_hosts_per_wave, keys)
        except RollInfeasible as e:
            errors.append(e)
            continue
        return rec.plan("hostmaint", predict, policy.maintenance_s)
    raise errors[0]


def _place_waves(hosts: Sequence[RollHost], max_per_wave: int, keys: _Keys) -> _Recorder:
    cloud = Cloud(hosts)
    rec = _Recorder(cloud)
    done: list[str] = []
    pending = set(cloud.names)
    while pending:
        order = sorted(pending, key=lambda h: _drain_order_key(cloud, h))
        free_mem = sum(cloud.free_memory(h) for h in done)
        free_cpu = sum(cloud.cap_cpu[h] - cloud.used_cpu[h] for h in done)
        wave: list[str] = []
        placed: list[_Placed] = []
        for host in order:
            if len(wave) == max_per_wave:
                break
            mem = cloud.vm_memory(host)
            cpu = cloud.used_cpu[host]
            if mem > free_mem or cpu > free_cpu:
                continue
            got = _onto_done(cloud, host, done, keys)
            if got is None:
                continue
            wave.append(host)
            placed += got
            free_mem -= mem
            free_cpu -= cpu
        if not wave:
            host, placed = _fallback(cloud, done, order, keys)
            wave = [host]
        rec.wave(wave, placed)
        done += wave
        pending -= set(wave)
    return rec


def naive_roll(
    hosts: Sequence[RollHost], predict: DrainPredictor, maintenance_s: float = 0.0
) -> RollPlan:
    """Host after host in name order; each VM (its hard-affinity group whole) to the
    least-filled host (memory) that is not being drained and can take it (capacity, hard
    groups), ignoring future drains; soft rules ignored."""
    cloud = Cloud(hosts)
    rec = _Recorder(cloud)
    drained: set[str] = set()
    for host in cloud.names:
        placed: list[_Placed] = []
        others = [h for h in cloud.names if h != host]
        for unit in sorted(cloud.units(host), key=lambda u: u.vms[0].name):
            refused: Counter[str] = Counter()
            target = _choose(cloud, unit, others, _least_filled_key(cloud), refused)
            if target is None:
                parts = ", ".join(f"{why} on {n}" for why, n in sorted(refused.items()))
                raise RollInfeasible(host, unit.vms[0].uuid, f"refused for {parts}")
            cloud.move(unit, host, target)
            placed.append((unit, host, target, None if target in drained else SCHEDULER_REASON))
        rec.wave([host], placed)
        drained.add(host)
    return rec.plan("naive", predict, maintenance_s)
