"""A lab drain by hostmaint against the same VMs moved one at a time, per guest mix.

Run as root: flock /tmp/hostmaint-lab.lock .venv/bin/python tools/bench_lab_onebyone.py
    [--mix demo|six|patterns ...] [--json FILE]

For each guest mix (a lab spec as etc/demo-lab.toml; MIXES names them) one lab
is brought up with every guest on host 0, and the guests are moved twice:

- hostmaint: `Drain` of host 0 through a coordinator daemon with the libvirt
  driver (tools/bench_lab_drain.py's), at the mix's policy: [demo]
  max_downtime_ms and the spec's optional [policy] table (DrainPolicy fields).
- one at a time: after every guest is back on host 0 (through the agents), the
  VMs of that drain's plan, in the order the drain started them, each started
  only when the previous one ended, to the target the plan chose, through the
  source agent's Migrate/WatchMigration/TuneMigration, each with the plan's
  tuning: its QEMU downtime limit (qemu_max_downtime_ms), auto-converge when its
  tuning is TUNING_AUTO_CONVERGE, post-copy permitted when the policy allows it
  and switched, when its tuning is TUNING_POSTCOPY, once its first pass and
  precopy_tries more rounds are done. The coordinator's run-time steps (raising
  the limit, vCPU throttling, a post-copy switch as a rescue, bursts) are not
  the plan's and are not replayed; a migration still running after
  ALONE_TIMEOUT_FACTOR times its predicted time (at least ALONE_TIMEOUT_MIN_S)
  is aborted and counted as failed.

The one-at-a-time makespan runs from the first start to the last end. The
drain's is shown two ways: from its first migration's start to its last VM's
end (the same span), and the journal's, from the drain's creation (measuring
dirty rates and planning included). The seconds the coordinator spent
measuring dirty rates before planning come from the plan (`dirty_rates`). It exits 1
when a mix's drain took longer than one at a time (first start to last end).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hostmaint.coordinator import cliformat, cliview
from hostmaint.lab import cluster, errors
from hostmaint.lab.demo import (
    DEFAULT_SPEC,
    DemoSettings,
    last_downtime_ms,
    load_demo,
    move_guests_to,
    placement,
    terminate_as_interrupt,
)
from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import coordinator_pb2 as cpb
from tools.bench_lab_drain import Controller, drain_events, migrate_one

MIXES_DIR = Path(__file__).resolve().parent.parent / "bench" / "mixes"
MIXES: dict[str, Path] = {
    "demo": DEFAULT_SPEC,
    "six": MIXES_DIR / "six.toml",
    "patterns": MIXES_DIR / "patterns.toml",
}
# [policy] keys a mix may set (the downtime limit is [demo]'s max_downtime_ms).
POLICY_KEYS: dict[str, type] = {
    "allow_postcopy": bool,
    "forbid_auto_converge": bool,
    "max_parallel_per_source": int,
    "max_parallel_per_target": int,
}
ALONE_TIMEOUT_FACTOR = 10.0
ALONE_TIMEOUT_MIN_S = 300.0


# ---- the mix -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mix:
    name: str
    path: Path
    settings: DemoSettings
    guests: tuple[str, ...]
    policy: cpb.DrainPolicy


def load_mix(name: str, path: Path) -> Mix:
    """The spec's lab, guests and drain policy; a bad [policy] raises SpecError."""
    settings, plans = load_demo(path)
    try:
        table = tomllib.loads(path.read_text()).get("policy", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise errors.SpecError(path, str(exc)) from exc
    unknown = set(table) - set(POLICY_KEYS)
    if unknown:
        raise errors.SpecError(path, f"[policy]: unknown keys {sorted(unknown)}")
    for key, value in table.items():
        kind = POLICY_KEYS[key]
        if type(value) is not kind or (isinstance(value, int) and value < 0):
            wanted = "true or false" if kind is bool else "a whole number >= 0"
            raise errors.SpecError(path, f"[policy]: {key} must be {wanted}, not {value!r}")
    policy = cpb.DrainPolicy(max_downtime_ms=settings.max_downtime_ms, **table)
    return Mix(name, path, settings, tuple(p.spec.name for p in plans), policy)


# ---- the plan, as the one-at-a-time run replays it -----------------------------------------


@dataclass(frozen=True)
class Step:
    """One VM of the one-at-a-time run: where to, and the plan's tuning."""

    name: str
    target: str
    tuning: str
    max_downtime_ms: int
    auto_converge: bool
    allow_postcopy: bool
    # the post-copy switch once QEMU's iteration count reaches this; None: no switch
    postcopy_at_iteration: int | None
    predicted_total_s: float


def steps_from_status(status: cpb.DrainStatus) -> list[Step]:
    """The plan's VMs in the order the drain started them (never started: plan order last)."""
    vms = {v.vm_uuid: v for v in status.vms}

    def started(m: cpb.PlannedMigration) -> tuple[float, int]:
        vm = vms.get(m.vm_uuid)
        if vm is None or not vm.HasField("started_at"):
            return (math.inf, m.position)
        return (vm.started_at.ToNanoseconds() / 1e9, m.position)

    notes = list(status.plan.notes)

    def postcopy_permitted(target: str) -> bool:
        # the plan permits post-copy at the start wherever the policy allows it and the
        # hosts can do it; where they cannot, its notes say so (planner._left_out)
        left_out = ("post-copy left out: the source", f" going to {target}: it cannot do it")
        return status.policy.allow_postcopy and not any(
            n.startswith("post-copy left out") and any(w in n for w in left_out) for n in notes
        )

    steps = []
    for m in sorted(status.plan.migrations, key=started):
        target = m.target_host or (vms[m.vm_uuid].target_host if m.vm_uuid in vms else "")
        if not target:
            raise ValueError(f"{m.name}: the plan names no target host")
        postcopy = m.tuning == cpb.TUNING_POSTCOPY
        steps.append(
            Step(
                name=m.name,
                target=target,
                tuning=cliformat.tuning_label(m.tuning),
                max_downtime_ms=m.qemu_max_downtime_ms,
                auto_converge=m.tuning == cpb.TUNING_AUTO_CONVERGE,
                allow_postcopy=postcopy or postcopy_permitted(target),
                # libvirt's iteration is 1 through the first pass and 2 after it
                postcopy_at_iteration=2 + m.precopy_tries if postcopy else None,
                predicted_total_s=m.predicted_total_s,
            )
        )
    return steps


def migrate_options(step: Step) -> apb.MigrateOptions:
    return apb.MigrateOptions(
        max_downtime_ms=step.max_downtime_ms,
        auto_converge=step.auto_converge,
        allow_postcopy=step.allow_postcopy,
    )


def alone_timeout_s(step: Step) -> float:
    return max(ALONE_TIMEOUT_MIN_S, ALONE_TIMEOUT_FACTOR * step.predicted_total_s)


def controller_for(step: Step) -> Callable[[str], Controller]:
    """The plan's post-copy switch, and the abort past alone_timeout_s."""
    timeout_s = alone_timeout_s(step)

    def make(uuid: str) -> Controller:
        switched = [False]

        def control(elapsed_s: float, p: apb.MigrationProgress) -> apb.TuneMigrationRequest | None:
            if elapsed_s > timeout_s:
                return apb.TuneMigrationRequest(domain_uuid=uuid, abort=True)
            at = step.postcopy_at_iteration
            if (
                at is not None
                and not switched[0]
                and p.phase == apb.MIGRATION_PHASE_PRECOPY
                and p.iteration >= at
            ):
                switched[0] = True
                return apb.TuneMigrationRequest(domain_uuid=uuid, start_postcopy=True)
            return None

        return control

    return make


def measuring_s(plan: cpb.DrainPlan) -> tuple[float | None, str]:
    """Seconds spent measuring dirty rates before planning (0 when every rate came from the
    agents' background readings; None: the plan does not say), and the plan's note."""
    rates = plan.dirty_rates
    said = rates.measured_vms or rates.background_vms
    return (rates.measuring_s if said else None), cliview.measuring_note(plan)


# ---- results -------------------------------------------------------------------------------


@dataclass
class VmRow:
    name: str
    target: str
    tuning: str
    predicted_s: float
    drain_s: float | None = None
    drain_ok: bool = False
    drain_downtime_ms: float | None = None
    drain_applied: str = ""
    alone_s: float | None = None
    alone_ok: bool = False
    alone_downtime_ms: float | None = None
    alone_note: str = ""


@dataclass
class MixResult:
    mix: str
    vms: int
    predicted_makespan_s: float
    # from the drain's first migration start to its last VM's end
    drain_span_s: float
    # the journal's: from the drain's creation (measuring and planning included)
    drain_total_s: float
    measuring_s: float | None
    measuring_note: str
    drain_failures: int
    drain_max_downtime_ms: float
    alone_makespan_s: float
    alone_failures: int
    alone_max_downtime_ms: float
    rows: list[VmRow] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.drain_span_s / self.alone_makespan_s if self.alone_makespan_s > 0 else math.nan

    @property
    def ratio_total(self) -> float:
        return self.drain_total_s / self.alone_makespan_s if self.alone_makespan_s > 0 else math.nan


def rows_from_status(status: cpb.DrainStatus, steps: Sequence[Step]) -> list[VmRow]:
    """One row per VM of the plan, in the one-at-a-time order, with the drain's figures."""
    vms = {v.name: v for v in status.vms}
    rows = []
    for s in steps:
        row = VmRow(s.name, s.target, _tuning_text(s), s.predicted_total_s)
        vm = vms.get(s.name)
        if vm is not None:
            row.drain_ok = vm.state == cpb.VM_STATE_COMPLETED
            row.drain_s = vm.actual_total_s if vm.HasField("started_at") else None
            row.drain_applied = ",".join(vm.tuning_applied)
        rows.append(row)
    return rows


def _tuning_text(s: Step) -> str:
    text = f"{s.tuning} {s.max_downtime_ms}ms"
    if s.postcopy_at_iteration is not None:
        text += f" pc@{s.postcopy_at_iteration}"
    return text


# ---- report --------------------------------------------------------------------------------


def _s(value: float | None) -> str:
    return "?" if value is None or math.isnan(value) else f"{value:.1f}"


def _ms(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"


SUMMARY_HEADERS = [
    "mix",
    "VMs",
    "pred s",
    "hostmaint s",
    "drain total s",
    "measuring s",
    "one-at-a-time s",
    "ratio",
    "ratio total",
    "fail hm",
    "fail 1by1",
    "max dt hm ms",
    "max dt 1by1 ms",
]


def render_summary(results: Sequence[MixResult]) -> str:
    rows = [
        [
            r.mix,
            str(r.vms),
            _s(r.predicted_makespan_s),
            _s(r.drain_span_s),
            _s(r.drain_total_s),
            _s(r.measuring_s),
            _s(r.alone_makespan_s),
            f"{r.ratio:.2f}",
            f"{r.ratio_total:.2f}",
            str(r.drain_failures),
            str(r.alone_failures),
            _ms(r.drain_max_downtime_ms),
            _ms(r.alone_max_downtime_ms),
        ]
        for r in results
    ]
    return cliformat.table(SUMMARY_HEADERS, rows, frozenset(range(1, len(SUMMARY_HEADERS))))


VM_HEADERS = [
    "vm",
    "target",
    "plan tuning",
    "pred s",
    "drain s",
    "alone s",
    "drain/pred",
    "alone/pred",
    "dt drain ms",
    "dt alone ms",
    "drain applied",
    "",
]


def render_vms(result: MixResult) -> str:
    rows = []
    for v in result.rows:
        verdict = [] if v.drain_ok else ["drain FAILED"]
        if not v.alone_ok:
            verdict.append("alone FAILED" + (f" ({v.alone_note})" if v.alone_note else ""))
        rows.append(
            [
                v.name,
                v.target,
                v.tuning,
                _s(v.predicted_s),
                _s(v.drain_s),
                _s(v.alone_s),
                _ratio(v.drain_s, v.predicted_s),
                _ratio(v.alone_s, v.predicted_s),
                _ms(v.drain_downtime_ms),
                _ms(v.alone_downtime_ms),
                v.drain_applied or "-",
                "; ".join(verdict),
            ]
        )
    return cliformat.table(VM_HEADERS, rows, frozenset(range(3, 10)))


def _ratio(actual: float | None, predicted: float) -> str:
    return f"{actual / predicted:.2f}" if actual is not None and predicted > 0 else "?"


def slower_mixes(results: Sequence[MixResult]) -> list[str]:
    """The mixes whose drain (first start to last end) took longer than one at a time."""
    return [r.mix for r in results if not r.drain_span_s <= r.alone_makespan_s]


def verdict(results: Sequence[MixResult]) -> str:
    slower = slower_mixes(results)
    if not slower:
        return "the drain was never slower than one at a time"
    by_mix = {r.mix: r for r in results}
    return "the drain was SLOWER than one at a time: " + ", ".join(
        f"{m} ({by_mix[m].ratio:.2f}x)" for m in slower
    )


def to_json(results: Sequence[MixResult]) -> str:
    out = []
    for r in results:
        d = dataclasses.asdict(r)
        d["ratio"] = r.ratio
        d["ratio_total"] = r.ratio_total
        out.append(d)
    return json.dumps(out, indent=2)


# ---- the lab -------------------------------------------------------------------------------


def run_alone(lab: cluster.Lab, steps: Sequence[Step], rows: Sequence[VmRow]) -> float:
    """The steps one after another; fills the rows' alone figures; returns the makespan."""
    by_name = {r.name: r for r in rows}
    first: float | None = None
    last = 0.0
    for step in steps:
        started = time.monotonic()
        first = started if first is None else first
        vm = migrate_one(
            lab, step.name, lab.host(step.target), migrate_options(step), controller_for(step)
        )
        last = started + vm.total_s
        row = by_name[step.name]
        row.alone_s, row.alone_ok, row.alone_note = vm.total_s, vm.ok, vm.note
        print(f"   {step.name}: {vm.total_s:.1f}s {'ok' if vm.ok else 'FAILED ' + vm.note}")
    for row in rows:  # kept by libvirt (KEEP_COMPLETED): read once every VM has moved
        if row.alone_ok:
            row.alone_downtime_ms = last_downtime_ms(lab, row.name)
    return last - first if first is not None else 0.0


def _check_placement(lab: cluster.Lab, guests: Sequence[str]) -> None:
    twice = [g for g, hs in placement(lab, guests).items() if len(hs) != 1]
    if twice:
        raise errors.LabError(f"guests not running exactly once: {twice}")


def run_mix(mix: Mix, args: argparse.Namespace) -> MixResult:
    work = Path(tempfile.mkdtemp(prefix=f"hm-l1b-{mix.name}-"))
    config = cluster.LabConfig(
        prefix=args.prefix,
        state_dir=work / "lab",
        subnet=args.subnet,
        rate_mbit=mix.settings.rate_mbit,
    )
    _, plans = load_demo(mix.path)
    plans = [cluster.GuestPlan(p.spec, 0) for p in plans]
    t0 = time.monotonic()
    print(f"== mix {mix.name} ({mix.path}): {len(plans)} guests, work {work}", flush=True)
    lab, report = cluster.Lab.up(mix.settings.hosts, plans, config)
    try:
        print(f"   lab up in {time.monotonic() - t0:.0f}s, accelerator {report.accel}", flush=True)
        if report.agent_failures:
            raise errors.LabError(f"agents did not start: {report.agent_failures}")
        home = lab.hosts[0]
        guests = list(mix.guests)

        print("   hostmaint drain", flush=True)
        events, call_s = drain_events(lab, work, mix.policy)
        status = events[-1].status
        steps = steps_from_status(status)
        rows = rows_from_status(status, steps)
        drain = {r.name: r for r in rows}
        for vm in status.vms:
            if vm.state == cpb.VM_STATE_COMPLETED and vm.name in drain:
                drain[vm.name].drain_downtime_ms = last_downtime_ms(lab, vm.name)
        _check_placement(lab, guests)
        seconds, note = measuring_s(status.plan)
        print(f"   drained in {call_s:.1f}s ({cliformat.drain_state_label(status.state)})")

        move_guests_to(lab, guests, home)
        _check_placement(lab, guests)
        print("   one at a time", flush=True)
        alone_s = run_alone(lab, steps, rows)
        _check_placement(lab, guests)
    finally:
        lab.down()
    s = status.summary
    drain_dts = [r.drain_downtime_ms for r in rows if r.drain_downtime_ms is not None]
    alone_dts = [r.alone_downtime_ms for r in rows if r.alone_downtime_ms is not None]
    return MixResult(
        mix=mix.name,
        vms=len(steps),
        predicted_makespan_s=status.plan.predicted_makespan_s,
        drain_span_s=(cliview.migration_window(status) or (0.0, 0.0))[1],
        drain_total_s=s.actual_makespan_s,
        measuring_s=seconds,
        measuring_note=note,
        drain_failures=sum(not r.drain_ok for r in rows),
        drain_max_downtime_ms=max(drain_dts, default=0.0),
        alone_makespan_s=alone_s,
        alone_failures=sum(not r.alone_ok for r in rows),
        alone_max_downtime_ms=max(alone_dts, default=0.0),
        rows=rows,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mix",
        action="append",
        choices=sorted(MIXES),
        help="a mix to run (repeatable; default: every mix)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="FILE")
    parser.add_argument("--prefix", default="hm-l1b")
    parser.add_argument("--subnet", default="10.213.33.0/24")
    args = parser.parse_args(argv)
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json: no directory {args.json.parent}")
    names = args.mix or list(MIXES)
    mixes = [load_mix(n, MIXES[n]) for n in names]  # every spec checked before any lab
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    results = []
    for mix in mixes:
        with terminate_as_interrupt():  # SIGTERM too takes the lab down
            r = run_mix(mix, args)
        results.append(r)
        print(
            f"\n-- {mix.name}: per VM (pred: the plan's; drain: in the drain; alone: one at a time)"
        )
        print(render_vms(r), flush=True)
        print(f"   measuring before the plan: {r.measuring_note or 'no note'}\n")
        if args.json is not None:
            args.json.write_text(to_json(results))
    print(render_summary(results))
    print(verdict(results))
    return 1 if slower_mixes(results) else 0


if __name__ == "__main__":
    sys.exit(main())
