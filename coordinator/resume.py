"""What a restarted coordinator resumes a drain from (pure).

Each VM's part of the plan as the journal keeps it (``VmPlan``, to and from the
journal with ``vm_plan_json`` and ``vm_plan_from_json``): its planned migration
(the settings it starts with and its ladder follows, what it needs of the link,
whether it runs alone), and what its ladder needs besides: whether throttling
its vCPUs slows its writer, and the tuning the source host could do when the
plan was made. A resumed drain runs that plan: nothing is measured again, and
the migrations it adopts keep their tuning.

And the escalation ladder's state of an adopted migration, replayed from the
tuning steps the journal holds of it (``ladder_state``): a step taken is not
taken again and the next one waits its time, as if no restart had happened. A
step whose outcome the journal does not know (the coordinator stopped during
it) counts as taken where taking it again would be wrong or harmless, and not
at all where the migration itself shows whether it happened: a post-copy
switch (its phase), an abort (it ends) and a burst's release (left holding, the
restart releases it, or lets it go on: ``hold_done`` says whether the hold in force
is known to have been carried out).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hostmaint.coordinator import escalation
from hostmaint.coordinator.model import FULLY_CAPABLE, HostCapabilities, Settings, Tuning
from hostmaint.coordinator.planner import PlannedMigration

# Steps that, when their outcome is unknown, the migration's own state answers.
_SEEN_ON_THE_JOB = frozenset(
    {escalation.Action.POSTCOPY, escalation.Action.ABORT, escalation.Action.RELEASE_LINK}
)


@dataclass(frozen=True)
class VmPlan:
    """One VM's part of the plan: its planned migration; whether its ladder may throttle
    its vCPUs (``planner.throttle_helps``); what the source host could tune."""

    planned: PlannedMigration
    cpu_bound: bool = False
    source: HostCapabilities = FULLY_CAPABLE


def vm_plan_json(plan: VmPlan) -> str:
    data = dataclasses.asdict(plan.planned)
    data["tuning"] = str(plan.planned.tuning)
    data["cpu_bound"] = plan.cpu_bound
    data["source"] = dataclasses.asdict(plan.source)
    return json.dumps(data, sort_keys=True)


def vm_plan_from_json(text: str) -> VmPlan:
    """``vm_plan_json``'s text back.

    Keys it does not know are left out and missing ones take their defaults where
    they have one (a journal written by another version); ValueError otherwise.
    """
    try:
        data = json.loads(text)
        settings = Settings(**_known(Settings, data["settings"]))
        values = _known(PlannedMigration, data)
        values["settings"] = settings
        values["tuning"] = Tuning(values["tuning"])
        source = HostCapabilities(**_known(HostCapabilities, data.get("source", {})))
        return VmPlan(PlannedMigration(**values), bool(data.get("cpu_bound", False)), source)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"not a journaled plan of a VM: {e!r}") from e


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass(frozen=True)
class TuneStep:
    """One step the ladder took on a migration, as journaled.

    ``label``: the step as the journal names it (``raise_downtime=800``,
    ``postcopy``); ``at_s``: when, in seconds since the migration started; ``ok``:
    whether it was carried out (None: unknown, the coordinator stopped during it);
    ``restore_ms``: for a hold of the link, the limit its release restores.
    """

    label: str
    at_s: float
    ok: bool | None
    restore_ms: int = 0


def ladder_state(steps: Sequence[TuneStep]) -> escalation.Escalation:
    """The ladder's state after these steps (in the order taken) of one migration."""
    done = escalation.Escalation()
    for step in steps:
        name, _, value = step.label.partition("=")
        try:
            decision = escalation.Decision(
                escalation.Action(name), int(value or 0), restore_ms=step.restore_ms
            )
        except ValueError:
            continue  # not a step of this ladder
        ok = step.ok
        if ok is None:
            if decision.action in _SEEN_ON_THE_JOB:
                continue
            # a hold may be holding the link (its release comes with the adoption); a
            # raise or a throttle counts as taken, failed or not
            ok = decision.action is escalation.Action.HOLD_LINK
        done = escalation.applied(done, decision, step.at_s, ok)
    return done


def hold_done(steps: Sequence[TuneStep]) -> bool:
    """Whether the migration holds the link by a hold known to have been carried out: its
    last hold or release of the link is a hold that succeeded."""
    for step in reversed(steps):
        name = step.label.partition("=")[0]
        if name == escalation.Action.RELEASE_LINK:
            return False
        if name == escalation.Action.HOLD_LINK:
            return step.ok is True
    return False
