"""The journal of rolls (rolling maintenance): each roll and each of its hosts' steps.

A host goes pending -> draining -> hook_running -> waiting -> done; a failed step
leaves it `failed` (and the roll `stopped`) until the operator resumes the roll or
skips the host. Every step is written before it is taken: `hook_started_at` before
the hook runs, so a coordinator restarted while a hook ran finds it started and not
finished, and stops there rather than run it a second time.
"""

from __future__ import annotations

import json
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

import sqlalchemy as sa

from hostmaint.coordinator import errors
from hostmaint.coordinator.journal import Journal, roll_hosts, rolls


class RollState(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"  # waits for the operator: resume, or skip the failed host
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


ACTIVE_ROLL_STATES = (RollState.RUNNING, RollState.CANCELLING)
OPEN_ROLL_STATES = (RollState.RUNNING, RollState.CANCELLING, RollState.STOPPED)


class RollHostState(StrEnum):
    PENDING = "pending"
    DRAINING = "draining"
    HOOK_RUNNING = "hook_running"
    WAITING = "waiting"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


# the step a host is at (or failed at)
STEP_DRAIN = "drain"
STEP_HOOK = "hook"
STEP_BACK = "back"
STEP_ENABLE = "enable"


@dataclass(frozen=True)
class RollRow:
    id: str
    state: RollState
    request: str
    plan: str
    message: str
    created_at: float
    finished_at: float | None
    cancel_requested: bool
    abort_running: bool


@dataclass(frozen=True)
class RollHostRow:
    roll_id: str
    host: str
    wave: int
    position: int
    state: RollHostState
    step: str = ""
    targets: str = "{}"
    predicted_s: float = 0.0
    drain_id: str = ""
    error: str = ""
    hook_started_at: float | None = None
    hook_finished_at: float | None = None
    hook_exit_code: int | None = None
    hook_output: str = ""
    versions_before: str = ""
    versions_after: str = ""
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def vm_targets(self) -> dict[str, str]:
        return dict(json.loads(self.targets or "{}"))


def _roll(row: Any) -> RollRow:
    values = {f.name: getattr(row, f.name) for f in fields(RollRow)}
    values["state"] = RollState(row.state)
    return RollRow(**values)


def _host(row: Any) -> RollHostRow:
    values = {f.name: getattr(row, f.name) for f in fields(RollHostRow)}
    values["state"] = RollHostState(row.state)
    return RollHostRow(**values)


class RollJournal:
    """The roll tables of `journal`'s database."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def create_roll(self, request: str, plan: str, hosts: Sequence[RollHostRow]) -> RollRow:
        roll_id = str(uuidlib.uuid4())
        with self.journal.transaction() as conn:
            conn.execute(
                rolls.insert().values(
                    id=roll_id,
                    state=RollState.RUNNING,
                    request=request,
                    plan=plan,
                    message="",
                    created_at=self.journal.now(),
                    cancel_requested=False,
                    abort_running=False,
                )
            )
            for h in hosts:
                values = {f.name: getattr(h, f.name) for f in fields(RollHostRow)}
                values["roll_id"] = roll_id
                conn.execute(roll_hosts.insert().values(**values))
        return self.roll(roll_id)

    def roll(self, roll_id: str) -> RollRow:
        with self.journal.engine.connect() as conn:
            row = conn.execute(sa.select(rolls).where(rolls.c.id == roll_id)).first()
        if row is None:
            raise errors.RollNotFound(roll_id)
        return _roll(row)

    def latest_roll(self) -> RollRow | None:
        with self.journal.engine.connect() as conn:
            row = conn.execute(
                sa.select(rolls).order_by(rolls.c.created_at.desc()).limit(1)
            ).first()
        return _roll(row) if row is not None else None

    def open_rolls(self) -> list[RollRow]:
        """Rolls not ended: running, cancelling, or stopped for the operator."""
        with self.journal.engine.connect() as conn:
            rows = conn.execute(
                sa.select(rolls)
                .where(rolls.c.state.in_(OPEN_ROLL_STATES))
                .order_by(rolls.c.created_at)
            ).all()
        return [_roll(r) for r in rows]

    def update_roll(self, roll_id: str, **values: Any) -> None:
        with self.journal.transaction() as conn:
            conn.execute(rolls.update().where(rolls.c.id == roll_id).values(**values))

    def finish_roll(self, roll_id: str, state: RollState, message: str = "") -> None:
        self.update_roll(roll_id, state=state, message=message, finished_at=self.journal.now())

    def hosts(self, roll_id: str) -> list[RollHostRow]:
        with self.journal.engine.connect() as conn:
            rows = conn.execute(
                sa.select(roll_hosts)
                .where(roll_hosts.c.roll_id == roll_id)
                .order_by(roll_hosts.c.position)
            ).all()
        return [_host(r) for r in rows]

    def host(self, roll_id: str, host: str) -> RollHostRow:
        for h in self.hosts(roll_id):
            if h.host == host:
                return h
        raise errors.UnknownHost(host)

    def update_host(self, roll_id: str, host: str, **values: Any) -> RollHostRow:
        with self.journal.transaction() as conn:
            conn.execute(
                roll_hosts.update()
                .where((roll_hosts.c.roll_id == roll_id) & (roll_hosts.c.host == host))
                .values(**values)
            )
        return self.host(roll_id, host)

    def now(self) -> float:
        return self.journal.now()
