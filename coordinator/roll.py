"""Rolling maintenance of a whole cloud, planned before anything moves (pure: no I/O, no clock).

Public API
----------
Values (frozen dataclasses, units in names):
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
``replay_roll(hosts, plan) -> RollAudit``: the plan replayed wave by wave from the
  hosts as given: the fullest any host gets, and every rule broken.
``RollInfeasible``: no roll keeps the rules (its ``host``, ``vm_uuid`` and ``reason``).

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

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from hostmaint.coordinator.model import VmSpec

HARD_AFFINITY = "affinity"
HARD_ANTI_AFFINITY = "anti-affinity"
SOFT_AFFINITY = "soft-affinity"
SOFT_ANTI_AFFINITY = "soft-anti-affinity"
GROUP_POLICIES = (HARD_AFFINITY, HARD_ANTI_AFFINITY, SOFT_AFFINITY, SOFT_ANTI_AFFINITY)

NO_HOST_DONE_REASON = "no host is done yet: it waits on a host drained later"
SCHEDULER_REASON = "the scheduler does not know its target is drained later"


@dataclass(frozen=True)
class RollHost:
    name: str
    memory_capacity_bytes: int  # what guests may use (after the host's own reservation)
    pcpus: int
    cpu_allocation_ratio: float = 1.0
    vms: tuple[VmSpec, ...] = ()
    # as the host reports it; the part beyond its VMs' memory (overheads) stays on the
    # host when they leave. None: the VMs' memory
    memory_used_bytes: int | None = None

    @property
    def vcpu_capacity(self) -> int:
        return math.floor(self.pcpus * self.cpu_allocation_ratio + 1e-9)

    @property
    def memory_overhead_bytes(self) -> int:
        if self.memory_used_bytes is None:
            return 0
        return max(0, self.memory_used_bytes - sum(v.memory_bytes for v in self.vms))


@dataclass(frozen=True)
class RollPolicy:
    max_hosts_per_wave: int = 1
    maintenance_s: float = 0.0  # patching and rebooting a wave's hosts, after their drain


@dataclass(frozen=True)
class DrainEstimate:
    time_s: float
    bytes_sent: float


# one host's drain predicted: the host, and each VM with its target
DrainPredictor = Callable[[str, Sequence[tuple[VmSpec, str]]], DrainEstimate]


@dataclass(frozen=True)
class RollMove:
    vm_uuid: str
    vm_name: str
    source: str
    target: str
    wave: int  # from 1
    nth: int  # the VM's first move, second, ...


@dataclass(frozen=True)
class Parked:
    """A VM sent to a host drained later in the roll: it moves again then."""

    vm_uuid: str
    vm_name: str
    wave: int
    source: str
    target: str
    reason: str


@dataclass(frozen=True)
class HostDrain:
    host: str
    moves: tuple[RollMove, ...]
    predicted_s: float
    bytes_sent: float


@dataclass(frozen=True)
class Wave:
    index: int  # from 1
    drains: tuple[HostDrain, ...]
    predicted_drain_s: float  # its longest host drain
    predicted_s: float  # with the maintenance
    memory_fill_peak: float  # the fullest host at the end of the wave (used / capacity)
    vcpu_fill_peak: float

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(d.host for d in self.drains)

    @property
    def bytes_sent(self) -> float:
        return sum(d.bytes_sent for d in self.drains)


@dataclass(frozen=True)
class RollPlan:
    strategy: str
    waves: tuple[Wave, ...]
    parked: tuple[Parked, ...]
    vm_count: int
    placement: tuple[tuple[str, str], ...]  # (VM uuid, host) at the end, by uuid
    memory_fill_peak: float  # the fullest any host is, from the start to the end
    vcpu_fill_peak: float

    @property
    def moves(self) -> tuple[RollMove, ...]:
        return tuple(m for w in self.waves for d in w.drains for m in d.moves)

    @property
    def moves_per_vm(self) -> float:
        return len(self.moves) / self.vm_count if self.vm_count else 0.0

    @property
    def predicted_s(self) -> float:
        return sum(w.predicted_s for w in self.waves)

    @property
    def bytes_sent(self) -> float:
        return sum(w.bytes_sent for w in self.waves)

    @property
    def host_order(self) -> tuple[tuple[str, ...], ...]:
        return tuple(w.hosts for w in self.waves)


@dataclass(frozen=True)
class RollAudit:
    memory_fill_peak: float
    vcpu_fill_peak: float
    violations: tuple[str, ...]


class RollInfeasible(Exception):
    """No host can take a VM without breaking capacity or a hard server-group rule."""

    def __init__(self, host: str, vm_uuid: str, reason: str) -> None:
        super().__init__(f"host {host}: VM {vm_uuid} has nowhere to go ({reason})")
        self.host = host
        self.vm_uuid = vm_uuid
        self.reason = reason


@dataclass(frozen=True)
class _Unit:
    """VMs that move together (a hard-affinity group's members on one host), as one."""

    vms: tuple[VmSpec, ...]
    memory_bytes: int
    vcpus: int
    anti: frozenset[str]  # hard anti-affinity groups
    affinity: tuple[tuple[str, int], ...]  # hard-affinity groups, members in the unit
    soft_anti: frozenset[str]
    soft_affinity: tuple[tuple[str, int], ...]

    @staticmethod
    def of(vms: Sequence[VmSpec]) -> _Unit:
        def groups(policy: str) -> Counter[str]:
            return Counter(g.id for v in vms for g in v.server_groups if g.policy == policy)

        return _Unit(
            vms=tuple(sorted(vms, key=lambda v: v.uuid)),
            memory_bytes=sum(v.memory_bytes for v in vms),
            vcpus=sum(v.vcpus for v in vms),
            anti=frozenset(groups(HARD_ANTI_AFFINITY)),
            affinity=tuple(sorted(groups(HARD_AFFINITY).items())),
            soft_anti=frozenset(groups(SOFT_ANTI_AFFINITY)),
            soft_affinity=tuple(sorted(groups(SOFT_AFFINITY).items())),
        )


class _Cloud:
    """Where every VM is, and each host's use: the roll's state while it is planned."""

    def __init__(self, hosts: Sequence[RollHost]) -> None:
        _validate(hosts)
        self.names = sorted(h.name for h in hosts)
        self.cap_mem = {h.name: h.memory_capacity_bytes for h in hosts}
        self.cap_cpu = {h.name: h.vcpu_capacity for h in hosts}
        self.used_mem = {h.name: h.memory_overhead_bytes for h in hosts}
        self.used_cpu = dict.fromkeys(self.cap_mem, 0)
        self.vms: dict[str, dict[str, VmSpec]] = {h.name: {} for h in hosts}
        self.members: dict[str, Counter[str]] = {h.name: Counter() for h in hosts}
        self.group_total: Counter[str] = Counter()
        self.moves: Counter[str] = Counter()  # per VM uuid
        for h in hosts:
            for vm in sorted(h.vms, key=lambda v: v.uuid):
                self._add(vm, h.name)
                self.group_total.update(g.id for g in vm.server_groups)

    def _add(self, vm: VmSpec, host: str) -> None:
        self.vms[host][vm.uuid] = vm
        self.used_mem[host] += vm.memory_bytes
        self.used_cpu[host] += vm.vcpus
        self.members[host].update(g.id for g in vm.server_groups)

    def _remove(self, vm: VmSpec, host: str) -> None:
        del self.vms[host][vm.uuid]
        self.used_mem[host] -= vm.memory_bytes
        self.used_cpu[host] -= vm.vcpus
        self.members[host].subtract(g.id for g in vm.server_groups)

    def move(self, unit: _Unit, source: str, target: str) -> None:
        for vm in unit.vms:
            self._remove(vm, source)
            self._add(vm, target)

    def units(self, host: str) -> list[_Unit]:
        """The host's VMs as units (hard-affinity groups whole), largest first."""
        vms = list(self.vms[host].values())
        parent = list(range(len(vms)))

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        first: dict[str, int] = {}
        for i, vm in enumerate(vms):
            for g in vm.server_groups:
                if g.policy == HARD_AFFINITY:
                    parent[root(i)] = root(first.setdefault(g.id, i))
        comps: dict[int, list[VmSpec]] = {}
        for i, vm in enumerate(vms):
            comps.setdefault(root(i), []).append(vm)
        units = [_Unit.of(c) for c in comps.values()]
        return sorted(units, key=_unit_order)

    def refusal(self, unit: _Unit, host: str) -> str | None:
        """Why ``host`` cannot take ``unit`` (None: it can)."""
        if self.used_mem[host] + unit.memory_bytes > self.cap_mem[host]:
            return "memory"
        if self.used_cpu[host] + unit.vcpus > self.cap_cpu[host]:
            return "vCPUs"
        here = self.members[host]
        if any(here[g] > 0 for g in unit.anti):
            return "anti-affinity"
        for g, n in unit.affinity:
            others = self.group_total[g] - n
            if others and here[g] != others:
                return "affinity"
        return None

    def soft_conflicts(self, unit: _Unit, host: str) -> int:
        here = self.members[host]
        cost = sum(here[g] for g in unit.soft_anti)
        return cost + sum(
            1 for g, n in unit.soft_affinity if self.group_total[g] > n and here[g] == 0
        )

    def memory_fill(self, host: str, extra_bytes: int = 0) -> float:
        cap = self.cap_mem[host]
        return (self.used_mem[host] + extra_bytes) / cap if cap else 0.0

    def vcpu_fill(self, host: str, extra: int = 0) -> float:
        cap = self.cap_cpu[host]
        return (self.used_cpu[host] + extra) / cap if cap else 0.0

    def vm_memory(self, host: str) -> int:
        return sum(v.memory_bytes for v in self.vms[host].values())

    def free_memory(self, host: str) -> int:
        return self.cap_mem[host] - self.used_mem[host]

    def fill_peaks(self) -> tuple[float, float]:
        return (
            max((self.memory_fill(h) for h in self.names), default=0.0),
            max((self.vcpu_fill(h) for h in self.names), default=0.0),
        )


def _unit_order(u: _Unit) -> tuple[int, int, int, str]:
    """The most constrained first (hard groups: fewer hosts can take it), then the largest."""
    return (-len(u.anti) - len(u.affinity), -u.memory_bytes, -u.vcpus, u.vms[0].uuid)


def _validate(hosts: Sequence[RollHost]) -> None:
    names = [h.name for h in hosts]
    if len(set(names)) != len(names):
        raise ValueError("host names repeat")
    uuids = [v.uuid for h in hosts for v in h.vms]
    if len(set(uuids)) != len(uuids):
        raise ValueError("a VM is listed twice")
    policy: dict[str, str] = {}
    hosts_of: dict[str, list[str]] = {}
    for h in hosts:
        if h.memory_capacity_bytes < 0 or h.pcpus < 0 or h.cpu_allocation_ratio < 0:
            raise ValueError(f"host {h.name}: negative capacity")
        used = h.memory_overhead_bytes + sum(v.memory_bytes for v in h.vms)
        if used > h.memory_capacity_bytes or sum(v.vcpus for v in h.vms) > h.vcpu_capacity:
            raise ValueError(f"host {h.name} is over its capacity already")
        for vm in h.vms:
            for g in vm.server_groups:
                if g.policy not in GROUP_POLICIES:
                    raise ValueError(f"server group {g.id}: unknown policy {g.policy!r}")
                if policy.setdefault(g.id, g.policy) != g.policy:
                    raise ValueError(f"server group {g.id} has two policies")
                hosts_of.setdefault(g.id, []).append(h.name)
    for gid, where in sorted(hosts_of.items()):
        if policy[gid] == HARD_AFFINITY and len(set(where)) > 1:
            raise ValueError(f"affinity group {gid} is split over hosts already")
        if policy[gid] == HARD_ANTI_AFFINITY and len(set(where)) < len(where):
            raise ValueError(f"anti-affinity group {gid} has members together already")


def _choose(
    cloud: _Cloud,
    unit: _Unit,
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


def _spread_key(cloud: _Cloud, unit: _Unit) -> Callable[[str], tuple[float | str, ...]]:
    """Done hosts: the fewest soft conflicts, then the least filled after the move."""
    return lambda h: (
        cloud.soft_conflicts(unit, h),
        cloud.memory_fill(h, unit.memory_bytes),
        cloud.vcpu_fill(h, unit.vcpus),
        h,
    )


def _best_fit_key(cloud: _Cloud, unit: _Unit) -> Callable[[str], tuple[float | str, ...]]:
    """Parking: the fewest soft conflicts, then the least free memory left (best fit)."""
    return lambda h: (
        cloud.soft_conflicts(unit, h),
        cloud.free_memory(h) - unit.memory_bytes,
        h,
    )


@dataclass(frozen=True)
class _Keys:
    """How targets are ranked: on done hosts, and when parked on hosts still to drain."""

    done: Callable[[_Cloud, _Unit], Callable[[str], tuple[float | str, ...]]]
    parking: Callable[[_Cloud, _Unit], Callable[[str], tuple[float | str, ...]]]


# tried in turn until one finds a roll: spreading onto done hosts and parking best fit;
# packing both (keeps room for a large VM later); spreading both
_KEYS = (
    _Keys(_spread_key, _best_fit_key),
    _Keys(_best_fit_key, _best_fit_key),
    _Keys(_spread_key, _spread_key),
)


def _least_filled_key(cloud: _Cloud) -> Callable[[str], tuple[float | str, ...]]:
    """The scheduler's weigher: the least filled (memory) now."""
    return lambda h: (cloud.memory_fill(h), h)


def _why(refused: Counter[str], hosts: int) -> str:
    parts = ", ".join(f"{why} on {n}" for why, n in sorted(refused.items()))
    return f"no host already done has room ({parts} of {hosts})"


# one unit's move while a wave is planned: unit, source, target, and the reason when parked
_Placed = tuple[_Unit, str, str, str | None]


def _undo(cloud: _Cloud, placed: Sequence[_Placed]) -> None:
    for unit, source, target, _ in reversed(placed):
        cloud.move(unit, target, source)


def _onto_done(cloud: _Cloud, host: str, done: Sequence[str], keys: _Keys) -> list[_Placed] | None:
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
    cloud: _Cloud, host: str, done: Sequence[str], pending: Sequence[str], keys: _Keys
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
    cloud: _Cloud, done: Sequence[str], pending: Sequence[str], keys: _Keys
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


def _drain_order_key(cloud: _Cloud, host: str) -> tuple[int, int, str]:
    return (-cloud.free_memory(host), cloud.vm_memory(host), host)


class _Recorder:
    """Turns placed units into moves and waves; the drains are predicted at the end."""

    def __init__(self, cloud: _Cloud) -> None:
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
    cloud = _Cloud(hosts)
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
    cloud = _Cloud(hosts)
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


def replay_roll(
    hosts: Sequence[RollHost], plan: RollPlan, max_hosts_per_wave: int | None = None
) -> RollAudit:
    """Replay ``plan`` from ``hosts`` wave by wave: the fullest any host gets (memory and
    vCPUs, used over capacity, at the end of each wave and at the start) and every rule
    broken: a host over capacity, a hard server-group rule broken, a VM moved from where
    it is not, to a host of its own wave, a host drained twice or never, a host left
    with VMs after its wave, a wave larger than ``max_hosts_per_wave``."""
    where = {v.uuid: h.name for h in hosts for v in h.vms}
    vm_of = {v.uuid: v for h in hosts for v in h.vms}
    by_name = {h.name: h for h in hosts}
    overhead = {h.name: h.memory_overhead_bytes for h in hosts}
    bad: list[str] = []
    peaks = [(0.0, 0.0)]

    def check(label: str) -> None:
        mem = dict(overhead)
        cpu = dict.fromkeys(by_name, 0)
        groups: dict[tuple[str, str], list[str]] = {}
        for uuid, at in where.items():
            mem[at] += vm_of[uuid].memory_bytes
            cpu[at] += vm_of[uuid].vcpus
            for group in vm_of[uuid].server_groups:
                groups.setdefault((group.policy, group.id), []).append(at)
        for name, host in by_name.items():
            cap_m, cap_c = host.memory_capacity_bytes, host.vcpu_capacity
            if mem[name] > cap_m or cpu[name] > cap_c:
                bad.append(f"{label}: host {name} over capacity")
            peaks.append((mem[name] / cap_m if cap_m else 0.0, cpu[name] / cap_c if cap_c else 0.0))
        for (policy, gid), at_hosts in groups.items():
            if policy == HARD_ANTI_AFFINITY and len(set(at_hosts)) < len(at_hosts):
                bad.append(f"{label}: anti-affinity group {gid} has members together")
            if policy == HARD_AFFINITY and len(set(at_hosts)) > 1:
                bad.append(f"{label}: affinity group {gid} is split")

    check("start")
    seen: set[str] = set()
    for w in plan.waves:
        label = f"wave {w.index}"
        if max_hosts_per_wave is not None and len(w.hosts) > max_hosts_per_wave:
            bad.append(f"{label}: {len(w.hosts)} hosts at once")
        if seen & set(w.hosts):
            bad.append(f"{label}: a host is drained twice")
        seen |= set(w.hosts)
        for m in (m for d in w.drains for m in d.moves):
            if where.get(m.vm_uuid) != m.source:
                bad.append(f"{label}: {m.vm_uuid} is not on {m.source}")
            if m.target in w.hosts or m.target not in by_name:
                bad.append(f"{label}: {m.vm_uuid} sent to {m.target}")
            where[m.vm_uuid] = m.target
        left = [u for u, h in where.items() if h in w.hosts]
        if left:
            bad.append(f"{label}: {len(left)} VMs left on its hosts")
        check(label)
    if seen != set(by_name):
        bad.append(f"hosts never drained: {sorted(set(by_name) - seen)}")
    return RollAudit(max(p[0] for p in peaks), max(p[1] for p in peaks), tuple(bad))
