"""The drain journal: every drain, every VM's state and every step, in a database.

A step is written as an intent before it is carried out and marked done (or
failed) after, so a coordinator that dies between the two finds the open
intent on restart and checks the world before doing anything again. One row
per host in `host_locks` makes a second drain of the same host fail in the
database itself, whatever coordinator tries.

SQLAlchemy Core over any URL: SQLite by default, PostgreSQL in production
(postgresql+psycopg://...). The schema is the tables below; the Alembic
revisions in `hostmaint.coordinator.migrations` create and change it, and a
test keeps the two equal.
"""

from __future__ import annotations

import contextlib
import json
import threading
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from hostmaint.common import extras
from hostmaint.coordinator import errors, migrations
from hostmaint.coordinator.states import ACTIVE_DRAIN_STATES, DrainState, VmState

metadata = sa.MetaData()

drains = sa.Table(
    "drains",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("host", sa.String(255), nullable=False, index=True),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("policy", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("plan", sa.Text, nullable=False, default=""),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("abort_running", sa.Boolean, nullable=False, default=False),
    sa.Column("error", sa.Text, nullable=False, default=""),
)

host_locks = sa.Table(
    "host_locks",
    metadata,
    sa.Column("host", sa.String(255), primary_key=True),
    sa.Column("drain_id", sa.String(36), nullable=False),
)

disabled_hosts = sa.Table(
    "disabled_hosts",
    metadata,
    sa.Column("host", sa.String(255), primary_key=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)

drain_vms = sa.Table(
    "drain_vms",
    metadata,
    sa.Column("drain_id", sa.String(36), sa.ForeignKey("drains.id"), primary_key=True),
    sa.Column("vm_uuid", sa.String(36), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("source_host", sa.String(255), nullable=False),
    sa.Column("planned_target", sa.String(255), nullable=False, default=""),
    sa.Column("target_host", sa.String(255), nullable=False, default=""),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("tuning", sa.String(32), nullable=False, default=""),
    sa.Column("predicted_total_s", sa.Float, nullable=False, default=0.0),
    sa.Column("predicted_downtime_ms", sa.Float, nullable=False, default=0.0),
    sa.Column("actual_total_s", sa.Float, nullable=False, default=0.0),
    sa.Column("actual_downtime_ms", sa.Float, nullable=False, default=0.0),
    sa.Column("tuning_applied", sa.Text, nullable=False, default="[]"),
    sa.Column("error", sa.Text, nullable=False, default=""),
    sa.Column("migration_ref", sa.Text, nullable=False, default=""),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
    # the VM's part of the plan (resume.vm_plan_json): its settings and its ladder's, so
    # that a resumed drain runs the plan it journaled; "" for a VM not planned to
    # live-migrate, and in journals written before revision 0002
    sa.Column("planned", sa.Text, nullable=False, default="", server_default=""),
    # the prediction revised from the migration's own rounds (forecast.py): its total
    # time, 0 when none was made or its rounds stopped shrinking; and why (revision 0004)
    sa.Column("revised_total_s", sa.Float, nullable=False, default=0.0, server_default="0"),
    sa.Column("revised_note", sa.Text, nullable=False, default="", server_default=""),
)

steps = sa.Table(
    "steps",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("drain_id", sa.String(36), sa.ForeignKey("drains.id"), nullable=False, index=True),
    sa.Column("vm_uuid", sa.String(36), nullable=False, default=""),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("detail", sa.Text, nullable=False, default="{}"),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("done_at", sa.Float, nullable=True),
    sa.Column("result", sa.Text, nullable=False, default=""),
)

# Rolling maintenance (revision 0003): one row per roll, one per host of it. A host's
# hook is journaled as started before it runs, so a restarted coordinator knows it may
# have run and does not run it again by itself.
rolls = sa.Table(
    "rolls",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("request", sa.Text, nullable=False),  # the RollRequest, as JSON
    sa.Column("plan", sa.Text, nullable=False),  # the RollPlan, as JSON
    sa.Column("message", sa.Text, nullable=False, default=""),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("abort_running", sa.Boolean, nullable=False, default=False),
)

roll_hosts = sa.Table(
    "roll_hosts",
    metadata,
    sa.Column("roll_id", sa.String(36), sa.ForeignKey("rolls.id"), primary_key=True),
    sa.Column("host", sa.String(255), primary_key=True),
    sa.Column("wave", sa.Integer, nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("step", sa.String(16), nullable=False, default=""),
    sa.Column("targets", sa.Text, nullable=False),  # {vm uuid: target host}, as JSON
    sa.Column("predicted_s", sa.Float, nullable=False, default=0.0),
    sa.Column("drain_id", sa.String(36), nullable=False, default=""),
    sa.Column("error", sa.Text, nullable=False, default=""),
    sa.Column("hook_started_at", sa.Float, nullable=True),
    sa.Column("hook_finished_at", sa.Float, nullable=True),
    sa.Column("hook_exit_code", sa.Integer, nullable=True),
    sa.Column("hook_output", sa.Text, nullable=False, default=""),
    sa.Column("versions_before", sa.Text, nullable=False, default=""),
    sa.Column("versions_after", sa.Text, nullable=False, default=""),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
)

STEP_INTENT = "intent"
STEP_DONE = "done"
STEP_FAILED = "failed"


@dataclass(frozen=True)
class DrainRow:
    id: str
    host: str
    state: DrainState
    policy: str
    reason: str
    plan: str
    created_at: float
    finished_at: float | None
    cancel_requested: bool
    abort_running: bool
    error: str


@dataclass(frozen=True)
class VmRow:
    drain_id: str
    vm_uuid: str
    name: str
    position: int
    state: VmState
    source_host: str
    planned_target: str = ""
    target_host: str = ""
    attempts: int = 0
    tuning: str = ""
    predicted_total_s: float = 0.0
    predicted_downtime_ms: float = 0.0
    actual_total_s: float = 0.0
    actual_downtime_ms: float = 0.0
    tuning_applied: tuple[str, ...] = field(default_factory=tuple)
    error: str = ""
    migration_ref: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    planned: str = ""
    revised_total_s: float = 0.0
    revised_note: str = ""

    def tuned(self, action: str) -> bool:
        """Whether the escalation ladder applied ``action`` to the VM's migration (each
        step is journaled as ``action`` or ``action=value``)."""
        return any(t.startswith(action) for t in self.tuning_applied)


@dataclass(frozen=True)
class StepRow:
    id: int
    drain_id: str
    vm_uuid: str
    action: str
    detail: dict[str, Any]
    state: str
    at: float
    done_at: float | None
    result: str


def _drain(row: Any) -> DrainRow:
    values = {f.name: getattr(row, f.name) for f in fields(DrainRow)}
    values["state"] = DrainState(row.state)
    return DrainRow(**values)


def _vm(row: Any) -> VmRow:
    values = {f.name: getattr(row, f.name) for f in fields(VmRow)}
    values["tuning_applied"] = tuple(json.loads(row.tuning_applied or "[]"))
    values["state"] = VmState(row.state)
    return VmRow(**values)


def _step(row: Any) -> StepRow:
    values = {f.name: getattr(row, f.name) for f in fields(StepRow)}
    values["detail"] = json.loads(row.detail or "{}")
    return StepRow(**values)


def make_engine(url: str) -> Engine:
    """An engine on the journal's URL; connects on first use.

    MissingExtra for a postgresql+psycopg URL when the `postgres` extra is not
    installed.
    """
    if url.startswith("sqlite"):
        # One writer at a time; wait for it rather than failing at once.
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    parsed = sa.engine.make_url(url)
    if (parsed.get_backend_name(), parsed.get_driver_name()) == ("postgresql", "psycopg"):
        extras.require(extras.POSTGRES, "[database] url", ["psycopg"])
    return sa.create_engine(url, pool_pre_ping=True)


class Journal:
    """The journal on `engine`.

    With `upgrade` (the default) the database's schema is brought to the newest
    revision first, creating it in an empty database; without, the schema must
    be at that revision already (migrations.SchemaOutOfDate otherwise).
    """

    def __init__(self, engine: Engine, clock: Callable[[], float], upgrade: bool = True) -> None:
        self._engine = engine
        self._clock = clock
        self._lock = threading.Lock()  # SQLite allows one writer; keep ours in line
        if upgrade:
            migrations.upgrade(engine)
        else:
            migrations.check(engine)

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self._lock, self._engine.begin() as conn:
            yield conn

    # For the journal's other tables (rolljournal): one writer at a time, as here.
    @property
    def engine(self) -> Engine:
        return self._engine

    def now(self) -> float:
        return self._clock()

    def transaction(self) -> contextlib.AbstractContextManager[Connection]:
        return self._tx()

    # -- drains ---------------------------------------------------------------------

    def create_drain(self, host: str, policy: str, reason: str) -> DrainRow:
        """A new drain holding the host's lock; DrainConflict when one runs."""
        drain_id = str(uuidlib.uuid4())
        now = self._clock()
        try:
            with self._tx() as conn:
                conn.execute(host_locks.insert().values(host=host, drain_id=drain_id))
                conn.execute(
                    drains.insert().values(
                        id=drain_id,
                        host=host,
                        state=DrainState.PLANNING,
                        policy=policy,
                        reason=reason,
                        plan="",
                        created_at=now,
                        cancel_requested=False,
                        abort_running=False,
                        error="",
                    )
                )
        except IntegrityError:
            holder = self.lock_holder(host)
            raise errors.DrainConflict(host, holder or "?") from None
        return self.drain(drain_id)

    def lock_holder(self, host: str) -> str | None:
        with self._engine.connect() as conn:
            row = conn.execute(
                sa.select(host_locks.c.drain_id).where(host_locks.c.host == host)
            ).first()
        return str(row.drain_id) if row is not None else None

    def drain(self, drain_id: str) -> DrainRow:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(drains).where(drains.c.id == drain_id)).first()
        if row is None:
            raise errors.DrainNotFound(f"with id {drain_id}")
        return _drain(row)

    def latest_drain(self, host: str) -> DrainRow | None:
        with self._engine.connect() as conn:
            row = conn.execute(
                sa.select(drains)
                .where(drains.c.host == host)
                .order_by(drains.c.created_at.desc())
                .limit(1)
            ).first()
        return _drain(row) if row is not None else None

    def active_drains(self) -> list[DrainRow]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(drains).where(drains.c.state.in_(ACTIVE_DRAIN_STATES))
            ).all()
        return [_drain(r) for r in rows]

    def drains_since(self, created_after: float) -> list[DrainRow]:
        """The drains created at or after `created_after` (seconds since the epoch), oldest first."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(drains)
                .where(drains.c.created_at >= created_after)
                .order_by(drains.c.created_at)
            ).all()
        return [_drain(r) for r in rows]

    def update_drain(self, drain_id: str, **values: Any) -> None:
        with self._tx() as conn:
            conn.execute(drains.update().where(drains.c.id == drain_id).values(**values))

    def finish_drain(self, drain_id: str, host: str, state: DrainState, error: str = "") -> None:
        """Ends a drain and releases its host in one transaction."""
        with self._tx() as conn:
            conn.execute(
                drains.update()
                .where(drains.c.id == drain_id)
                .values(state=state, finished_at=self._clock(), error=error)
            )
            conn.execute(
                host_locks.delete().where(
                    (host_locks.c.host == host) & (host_locks.c.drain_id == drain_id)
                )
            )

    def request_cancel(self, drain_id: str, abort_running: bool) -> None:
        with self._tx() as conn:
            conn.execute(
                drains.update()
                .where(drains.c.id == drain_id)
                .values(cancel_requested=True, abort_running=abort_running)
            )

    # -- VMs ------------------------------------------------------------------------

    def save_plan(self, drain_id: str, plan: str, vms: Sequence[VmRow]) -> None:
        """The plan and every VM's row, once: a resumed drain keeps its first plan's VMs."""
        with self._tx() as conn:
            conn.execute(
                drains.update()
                .where(drains.c.id == drain_id)
                .values(plan=plan, state=DrainState.RUNNING)
            )
            existing = {
                r.vm_uuid
                for r in conn.execute(
                    sa.select(drain_vms.c.vm_uuid).where(drain_vms.c.drain_id == drain_id)
                )
            }
            for vm in vms:
                if vm.vm_uuid in existing:
                    continue
                values = {f.name: getattr(vm, f.name) for f in fields(VmRow)}
                values["tuning_applied"] = json.dumps(list(vm.tuning_applied))
                conn.execute(drain_vms.insert().values(**values))

    def vms(self, drain_id: str) -> list[VmRow]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(drain_vms)
                .where(drain_vms.c.drain_id == drain_id)
                .order_by(drain_vms.c.position)
            ).all()
        return [_vm(r) for r in rows]

    def vm(self, drain_id: str, vm_uuid: str) -> VmRow:
        with self._engine.connect() as conn:
            row = conn.execute(
                sa.select(drain_vms).where(
                    (drain_vms.c.drain_id == drain_id) & (drain_vms.c.vm_uuid == vm_uuid)
                )
            ).first()
        if row is None:
            raise errors.DrainNotFound(f"VM {vm_uuid} in drain {drain_id}")
        return _vm(row)

    def update_vm(self, drain_id: str, vm_uuid: str, **values: Any) -> VmRow:
        if "tuning_applied" in values:
            values["tuning_applied"] = json.dumps(list(values["tuning_applied"]))
        with self._tx() as conn:
            conn.execute(
                drain_vms.update()
                .where((drain_vms.c.drain_id == drain_id) & (drain_vms.c.vm_uuid == vm_uuid))
                .values(**values)
            )
        return self.vm(drain_id, vm_uuid)

    # -- steps ----------------------------------------------------------------------

    def begin_step(
        self, drain_id: str, action: str, vm_uuid: str = "", detail: dict[str, Any] | None = None
    ) -> int:
        with self._tx() as conn:
            result = conn.execute(
                steps.insert().values(
                    drain_id=drain_id,
                    vm_uuid=vm_uuid,
                    action=action,
                    detail=json.dumps(detail or {}, sort_keys=True),
                    state=STEP_INTENT,
                    at=self._clock(),
                    result="",
                )
            )
            key = result.inserted_primary_key
            assert key is not None
            return int(key[0])

    def end_step(self, step_id: int, ok: bool, result: str = "") -> None:
        with self._tx() as conn:
            conn.execute(
                steps.update()
                .where(steps.c.id == step_id)
                .values(
                    state=STEP_DONE if ok else STEP_FAILED, done_at=self._clock(), result=result
                )
            )

    def steps(self, drain_id: str) -> list[StepRow]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(steps).where(steps.c.drain_id == drain_id).order_by(steps.c.id)
            ).all()
        return [_step(r) for r in rows]

    def open_steps(self, drain_id: str) -> list[StepRow]:
        return [s for s in self.steps(drain_id) if s.state == STEP_INTENT]

    # -- hosts disabled by the coordinator itself (the libvirt driver) ---------------

    def disable_host(self, host: str, reason: str) -> None:
        with self._tx() as conn:
            conn.execute(disabled_hosts.delete().where(disabled_hosts.c.host == host))
            conn.execute(disabled_hosts.insert().values(host=host, reason=reason, at=self._clock()))

    def enable_host(self, host: str) -> None:
        with self._tx() as conn:
            conn.execute(disabled_hosts.delete().where(disabled_hosts.c.host == host))

    def disabled_reason(self, host: str) -> str | None:
        with self._engine.connect() as conn:
            row = conn.execute(
                sa.select(disabled_hosts.c.reason).where(disabled_hosts.c.host == host)
            ).first()
        return str(row.reason) if row is not None else None
