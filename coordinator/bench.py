"""Benchmark: hostmaint's plan against today's drains on seeded scenarios.

Run: ``python -m hostmaint.coordinator.bench [--quick] [--informed] [--postcopy-stretch F]``.
For each scenario it plans with the VMs as the agents report them (``--informed``: with
the working sets and writer kinds of most VMs known as well; ``--postcopy-stretch``: with
that trade of makespan for fewer post-copies instead of the policy's default), then
simulates the plan and every baseline against the true VMs, and prints the makespans, the
ratios to Nova's default, to hardened Nova and to the lower bound, and per strategy the
VMs that failed (aborted or never started), went over the downtime cap, or went through
post-copy.

The lower bound (``bounds.lower_bound`` of the true VMs the plan moves) is what no drain
within the policy beats: ``lb_s`` is its largest part, ``copy_s`` the part that counts
each page once over the link (no resends, no per-stream cap, no parallelism limit).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence

from hostmaint.coordinator import baselines
from hostmaint.coordinator.bounds import LowerBound, lower_bound
from hostmaint.coordinator.limits import MAX_POSTCOPY_STRETCH
from hostmaint.coordinator.model import DEFAULT_PARAMS, VmSpec
from hostmaint.coordinator.planner import plan_drain, plan_strategy
from hostmaint.coordinator.scenarios import Scenario, standard_scenarios
from hostmaint.coordinator.simulator import SimResult, Strategy, simulate

BASELINES: dict[str, Callable[[Sequence[VmSpec]], Strategy]] = {
    "nova-default": baselines.nova_default,
    "nova-hardened": baselines.nova_hardened,
    "kubevirt": baselines.kubevirt_default,
    "all-parallel": baselines.all_parallel,
}


def run_scenario(sc: Scenario) -> tuple[dict[str, SimResult], LowerBound, int]:
    plan = plan_drain(sc.reported, sc.targets, sc.link, sc.policy, DEFAULT_PARAMS)
    moving = {m.vm_uuid for m in plan.migrations}
    truth = [v for v in sc.truth if v.uuid in moving]
    results = {
        "hostmaint": simulate(
            truth,
            plan_strategy(plan, truth, sc.link, sc.policy, reported=sc.reported),
            sc.link,
            seed=sc.seed,
            policy=sc.policy,
        )
    }
    for name, make in BASELINES.items():
        results[name] = simulate(truth, make(truth), sc.link, seed=sc.seed, policy=sc.policy)
    return results, lower_bound(truth, sc.link, sc.policy, DEFAULT_PARAMS), len(plan.unmovable)


def _fmt_s(x: float) -> str:
    return f"{x:9.0f}" if x >= 100 else f"{x:9.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="only the first three scenarios")
    ap.add_argument(
        "--informed",
        action="store_true",
        help="plan knowing most VMs' working sets and writer kinds (the agents report neither)",
    )
    ap.add_argument(
        "--postcopy-stretch",
        type=float,
        default=None,
        metavar="F",
        help="plan with this post-copy avoidance stretch (0: the soonest plan) instead of "
        "the policy's default",
    )
    args = ap.parse_args(argv)
    scenarios = standard_scenarios(args.informed)[: 3 if args.quick else None]
    if args.postcopy_stretch is not None:
        if not 0.0 <= args.postcopy_stretch <= MAX_POSTCOPY_STRETCH:
            ap.error(f"--postcopy-stretch must be between 0 and {MAX_POSTCOPY_STRETCH:g}")
        scenarios = [
            dataclasses.replace(
                sc,
                policy=dataclasses.replace(
                    sc.policy, postcopy_avoidance_stretch=args.postcopy_stretch
                ),
            )
            for sc in scenarios
        ]
    names = ["hostmaint", *BASELINES]
    out = sys.stdout
    out.write(
        f"{'scenario':14} {'vms':>3} {'copy_s':>7} {'lb_s':>7} "
        + " ".join(f"{n:>13}" for n in names)
        + f" {'hm/nova':>7} {'hm/hard':>7} {'hm/copy':>7} {'hm/lb':>6}\n"
    )
    detail: list[str] = []
    for sc in scenarios:
        res, bound, unmovable = run_scenario(sc)
        hm = res["hostmaint"].makespan_s
        lb = bound.bound_s
        row = f"{sc.name:14} {len(sc.truth):3d} {bound.first_copy_s:7.0f} {lb:7.0f} " + " ".join(
            f"{_fmt_s(res[n].makespan_s):>13}" for n in names
        )
        row += f" {hm / res['nova-default'].makespan_s:7.3f}"
        row += f" {hm / res['nova-hardened'].makespan_s:7.3f}"
        row += f" {hm / bound.first_copy_s:7.2f} {hm / lb:6.2f}"
        out.write(row + "\n")
        out.flush()
        parts = [
            f"unmovable={unmovable}",
            f"bound: bytes {bound.bytes_s:.0f} s, slots {bound.slots_s:.0f} s,"
            f" longest {bound.longest_s:.0f} s",
        ]
        for n in names:
            r = res[n]
            parts.append(
                f"{n}: failed={r.failed} over_downtime={r.over_downtime} postcopy={r.postcopy_count}"
            )
        detail.append(f"  {sc.name}: " + "; ".join(parts))
    out.write(
        "\n(failed = aborted or never started; over_downtime = real downtime above the cap)\n"
    )
    out.write("\n".join(detail) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
