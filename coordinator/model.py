"""Convergence model of QEMU pre-copy live migration: its values (pure: no I/O, no clock).

Public API
----------
Values (frozen dataclasses, units in names):
  ``VmSpec``        a VM as the agents report it (memory, non-zero bytes, dirty rate,
                    working set, writer kind, CPU, server groups, blockers, downtime cap).
  ``HostCapabilities`` the tuning a host can do (vCPU throttling, post-copy), and why not.
  ``TargetHost``    a candidate target: free memory/vCPUs, CPU compatibility, health,
                    capabilities.
  ``Link``          migration bandwidth of the source host (and an optional per-stream cap).
  ``DrainPolicy``   operator policy: max downtime, parallelism, post-copy/auto-converge, deadline.
  ``ModelParams``   the physics' constants (QEMU defaults plus calibratable overheads).
  ``Settings``      how one migration is started: QEMU downtime limit, auto-converge,
                    post-copy (immediately after the first round), bandwidth cap.
  ``Prediction``    expected total time, downtime, rounds, convergence and the tuning.
Enums (string valued): ``WriterKind``, ``Tuning``, ``Phase``, ``Outcome``.

Functions:
  ``first_round_bytes(vm, params)``, ``zero_scan_s(vm, params)``: round 1's link bytes
      and its zero-page scan time.
  ``effective_bandwidth(link, params)``: the payload bandwidth one migration gets alone.
  ``qemu_downtime_limit_ms(cap_ms, bandwidth_bytes_per_s, params, worst_bandwidth)``
      the limit to hand QEMU so that the *real* downtime stays under ``cap_ms`` (less a
      headroom), even if the bandwidth drops to ``worst_bandwidth`` at switch-over.

One migration simulated, and the prediction of the cheapest tuning built on it, are
``convergence``.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

MIB = 1024 * 1024
GIB = 1024 * MIB


class WriterKind(enum.StrEnum):
    CPU = "cpu"
    PACED = "paced"
    UNKNOWN = "unknown"


class Tuning(enum.StrEnum):
    NONE = "none"
    RAISE_DOWNTIME = "raise_downtime"
    AUTO_CONVERGE = "auto_converge"
    POSTCOPY = "postcopy"
    CANNOT_CONVERGE = "cannot_converge"


class Phase(enum.StrEnum):
    SETUP = "setup"
    PRECOPY = "precopy"
    SWITCHOVER = "switchover"
    POSTCOPY_SWITCH = "postcopy_switch"
    POSTCOPY = "postcopy"
    FINISH = "finish"
    DONE = "done"
    ABORTED = "aborted"


class Outcome(enum.StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    ABORTED = "aborted"
    NOT_CONVERGED = "not_converged"


@dataclass(frozen=True)
class ServerGroup:
    id: str
    policy: str  # "affinity", "anti-affinity", "soft-affinity", "soft-anti-affinity"


@dataclass(frozen=True)
class VmSpec:
    uuid: str
    name: str
    memory_bytes: int
    nonzero_bytes: int | None = None  # RSS / non-zero pages; None: all memory
    dirty_rate_bytes_per_s: float = 0.0
    working_set_bytes: int | None = None  # None: unknown, estimated as the non-zero bytes
    writer: WriterKind = WriterKind.UNKNOWN
    vcpus: int = 1
    cpu_model: str = ""
    cpu_features: frozenset[str] = frozenset()
    server_groups: tuple[ServerGroup, ...] = ()
    blockers: tuple[str, ...] = ()
    max_downtime_ms: float | None = None  # overrides the policy's
    # set when the rate is not known, only that it is at least this much (a working set
    # rewritten within the shortest measuring window); the rate above is then assumed
    dirty_rate_floor_bytes_per_s: float | None = None

    @property
    def sent_bytes(self) -> int:
        return self.memory_bytes if self.nonzero_bytes is None else self.nonzero_bytes

    @property
    def working_set_estimate_bytes(self) -> int:
        if self.working_set_bytes is not None:
            return self.working_set_bytes
        return self.sent_bytes


@dataclass(frozen=True)
class HostCapabilities:
    """The tuning a host can do, as its agent reports it, with its reasons when not; a
    host whose agent does not say is taken to do all of it."""

    vcpu_throttle: bool = True  # libvirt's cgroup CPU controller (the ladder's throttle)
    vcpu_throttle_reason: str = ""
    postcopy: bool = True  # userfaultfd, usable by QEMU
    postcopy_reason: str = ""


FULLY_CAPABLE = HostCapabilities()


@dataclass(frozen=True)
class TargetHost:
    name: str
    free_memory_bytes: int
    free_vcpus: int
    healthy: bool = True
    cpu_compatible: frozenset[str] | None = None  # VM uuids it accepts; None: all
    cpu_refusals: tuple[tuple[str, str], ...] = ()  # (VM uuid, why its CPU is refused)
    server_groups: frozenset[str] = frozenset()  # groups with members already there
    capabilities: HostCapabilities = FULLY_CAPABLE


@dataclass(frozen=True)
class Link:
    bandwidth_bytes_per_s: float
    max_stream_bytes_per_s: float | None = None  # what one migration stream can reach


@dataclass(frozen=True)
class DrainPolicy:
    max_downtime_ms: float = 500.0
    max_parallel_per_source: int = 4
    max_parallel_per_target: int = 2
    allow_postcopy: bool = False
    allow_auto_converge: bool = True
    deadline_s: float | None = None
    # how much longer than the soonest plan (a fraction) the drain may take to send fewer
    # VMs through post-copy
    postcopy_avoidance_stretch: float = 0.05

    def downtime_cap_ms(self, vm_max_downtime_ms: float | None) -> float:
        """The operator's limit on one VM's downtime: the VM's own, else the policy's."""
        return self.max_downtime_ms if vm_max_downtime_ms is None else vm_max_downtime_ms


@dataclass(frozen=True)
class ModelParams:
    qemu_default_downtime_ms: float = 300.0
    qemu_max_downtime_ms: float = 2_000_000.0
    switchover_ms: float = 16.0  # fixed cost of stopping, switching and resuming (fitted)
    device_state_bytes: int = 2 * MIB
    iteration_s: float = 0.05  # QEMU's MAX_WAIT per iteration of the send loop
    link_efficiency: float = 0.94  # payload per link byte (TCP/IP and page headers)
    zero_page_cost_fraction: float = 0.002  # zero pages: the page header on the link
    zero_scan_bytes_per_s: float = 1.342e9  # QEMU finding zero pages (CPU-bound), fitted
    # Writes behind the copy cursor, as a share of a uniformly placed writer's. Planning
    # assumes the uniform writer (1.0): a real guest's write order is unknown, and a lower
    # value predicts convergence that may not come. The lab guest walks its working set in
    # the copy's direction; its measured value is SEQUENTIAL_WRITER_BEHIND_FACTOR.
    behind_write_factor: float = 1.0
    throttle_trigger_pct: float = 50.0
    throttle_initial_pct: float = 20.0
    throttle_increment_pct: float = 10.0
    throttle_max_pct: float = 99.0
    throttle_period_s: float = 1.0
    cpu_max_dirty_bytes_per_s: float = 4.0 * GIB  # the vCPUs writing flat out
    # Fixed costs around the transfer, fitted to the lab's ground truth (bench/, with
    # ``python -m hostmaint.coordinator.calibrate bench/lab-groundtruth.csv --fit``).
    setup_s: float = 1.0  # prepare target, start QEMU there: no bandwidth used
    finish_s: float = 0.24  # post-migration clean-up on both hosts
    max_rounds: int = 5000
    max_precopy_bytes_factor: float = 10.0  # pre-copy resending more than this is "no"
    downtime_headroom: float = 0.85  # of (cap - margin): bandwidth may drop at switch-over
    horizon_s: float = 3600.0  # a prediction gives up after this long


DEFAULT_PARAMS = ModelParams()
# Fitted to the lab's ground truth (calibrate --fit): a writer walking its working set in
# address order, as QEMU's copy does, mostly stays ahead of the cursor.
SEQUENTIAL_WRITER_BEHIND_FACTOR = 0.032


@dataclass(frozen=True)
class Settings:
    downtime_limit_ms: float
    auto_converge: bool = False
    postcopy_permitted: bool = False
    postcopy_after_first_round: bool = False
    max_bandwidth_bytes_per_s: float | None = None
    # with postcopy_after_first_round: the rounds after the first pass that pre-copy gets
    # to converge before the switch (a writer whose rate is known only from below may
    # be slow enough; the switch catches it if not)
    precopy_tries: int = 0
    # not QEMU's: how long the migration may hold the link for its switch-over (the
    # escalation ladder caps the others meanwhile); 0: never
    burst_s: float = 0.0


@dataclass(frozen=True)
class Prediction:
    tuning: Tuning
    converges: bool  # with the tuning
    converges_untuned: bool
    total_s: float  # setup to finish, alone on the link
    downtime_ms: float
    rounds: int
    bytes_sent: float
    qemu_downtime_limit_ms: float
    settings: Settings
    final_throttle_pct: float = 0.0


def first_round_bytes(vm: VmSpec, params: ModelParams = DEFAULT_PARAMS) -> float:
    """Link bytes of round 1: every non-zero page, and a header for each zero page."""
    return vm.sent_bytes + _zero_bytes(vm) * params.zero_page_cost_fraction


def zero_scan_s(vm: VmSpec, params: ModelParams = DEFAULT_PARAMS) -> float:
    """Round 1's scan of the zero pages (CPU-bound, no bandwidth)."""
    return _zero_bytes(vm) / params.zero_scan_bytes_per_s


def _zero_bytes(vm: VmSpec) -> int:
    return max(0, vm.memory_bytes - vm.sent_bytes)


def effective_bandwidth(link: Link, params: ModelParams = DEFAULT_PARAMS) -> float:
    """Payload bandwidth one migration alone gets on the link."""
    bw = link.bandwidth_bytes_per_s * params.link_efficiency
    if link.max_stream_bytes_per_s is not None:
        bw = min(bw, link.max_stream_bytes_per_s)
    return bw


def margin_ms(bandwidth_bytes_per_s: float, params: ModelParams = DEFAULT_PARAMS) -> float:
    """Real downtime beyond QEMU's limit: device state plus the fixed switch-over."""
    return params.switchover_ms + 1000.0 * params.device_state_bytes / bandwidth_bytes_per_s


def qemu_downtime_limit_ms(
    cap_ms: float,
    bandwidth_bytes_per_s: float,
    params: ModelParams = DEFAULT_PARAMS,
    worst_bandwidth_bytes_per_s: float | None = None,
) -> float:
    """QEMU's limit for a real downtime under ``cap_ms``.

    QEMU decides with the bandwidth it measures (``bandwidth``) but the final copy may run
    at the share left when other migrations start (``worst_bandwidth``).
    """
    worst = worst_bandwidth_bytes_per_s or bandwidth_bytes_per_s
    scale = min(1.0, worst / bandwidth_bytes_per_s)
    limit = (cap_ms - margin_ms(worst, params)) * params.downtime_headroom * scale
    return max(0.0, min(limit, params.qemu_max_downtime_ms))


def with_params(params: ModelParams, **changes: float) -> ModelParams:
    return dataclasses.replace(params, **changes)  # type: ignore[arg-type]
