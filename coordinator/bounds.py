"""Lower bounds on a drain's makespan (pure).

Public API
----------
``lower_bound(vms, link, policy, params=DEFAULT_PARAMS) -> LowerBound``
    what no drain of ``vms`` within ``policy`` can beat, with the model's physics.
``LowerBound``: its parts and ``bound_s``, the largest of them:

* ``first_copy_s``: every non-zero page once (and a header per zero page) over the
  link's payload bandwidth; what any migration must send even with no guest writing;
* ``bytes_s``: what each VM sends at the least (its fastest run alone at the full
  bandwidth one migration gets, with the settings the policy allows: a higher downtime
  limit up to the cap, auto-converge for CPU-bound writers, post-copy if permitted) over
  the link: a dirty VM must resend what it dirties, and sharing the link only adds to it;
* ``slots_s``: the VMs' shortest run times (set-up, copy at one stream's bandwidth,
  QEMU's zero-page scan, switch-over, finish) over the source's parallel slots: the
  policy's ``max_parallel_per_source`` caps how many run at once;
* ``longest_s``: the longest of those shortest run times.

Each VM's shortest run is ``convergence.run_alone`` with the set-up at its least
(``simulator.SETUP_JITTER``); one that converges with no allowed setting counts its
first copy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from hostmaint.coordinator.convergence import candidate_settings, run_alone
from hostmaint.coordinator.model import (
    DEFAULT_PARAMS,
    DrainPolicy,
    Link,
    ModelParams,
    Outcome,
    VmSpec,
    effective_bandwidth,
    first_round_bytes,
    zero_scan_s,
)
from hostmaint.coordinator.simulator import SETUP_JITTER


@dataclass(frozen=True)
class LowerBound:
    first_copy_s: float
    bytes_s: float
    slots_s: float
    longest_s: float

    @property
    def bound_s(self) -> float:
        return max(self.first_copy_s, self.bytes_s, self.slots_s, self.longest_s)


@dataclass(frozen=True)
class VmFloor:
    """The least one VM's migration takes and sends."""

    first_copy_bytes: float
    bytes_sent: float
    run_s: float


def vm_floor(
    vm: VmSpec, link: Link, policy: DrainPolicy, params: ModelParams = DEFAULT_PARAMS
) -> VmFloor:
    bw = effective_bandwidth(link, params)
    first = first_round_bytes(vm, params)
    setup_slack_s = params.setup_s * SETUP_JITTER  # a set-up can be this much shorter
    best_s, best_bytes = math.inf, math.inf
    # none, then the highest limit the cap allows: alone, with auto-converge, post-copy
    for _, settings in candidate_settings(vm, bw, policy, params):
        mig = run_alone(vm, bw, settings, params)
        if mig.outcome is Outcome.COMPLETED and mig.end_s is not None:
            best_s = min(best_s, mig.end_s - mig.start_s - setup_slack_s)
            best_bytes = min(best_bytes, mig.bytes_sent)
    if math.isinf(best_s):  # converges with nothing allowed: its first copy at the least
        best_s = params.setup_s - setup_slack_s + first / bw + zero_scan_s(vm, params)
        best_bytes = first
    return VmFloor(first, best_bytes, best_s)


def lower_bound(
    vms: Sequence[VmSpec],
    link: Link,
    policy: DrainPolicy,
    params: ModelParams = DEFAULT_PARAMS,
) -> LowerBound:
    floors = [vm_floor(v, link, policy, params) for v in vms]
    link_bw = link.bandwidth_bytes_per_s * params.link_efficiency
    slots = max(1, policy.max_parallel_per_source)
    return LowerBound(
        first_copy_s=sum(f.first_copy_bytes for f in floors) / link_bw,
        bytes_s=sum(f.bytes_sent for f in floors) / link_bw,
        slots_s=sum(f.run_s for f in floors) / slots,
        longest_s=max((f.run_s for f in floors), default=0.0),
    )
