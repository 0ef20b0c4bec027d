"""The drain journal as first released: drains, their VMs and steps, host locks.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "disabled_hosts",
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("host"),
    )
    op.create_table(
        "drains",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("policy", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("plan", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("abort_running", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_drains_host", "drains", ["host"], unique=False)
    op.create_table(
        "host_locks",
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("drain_id", sa.String(length=36), nullable=False),
        sa.PrimaryKeyConstraint("host"),
    )
    op.create_table(
        "drain_vms",
        sa.Column("drain_id", sa.String(length=36), nullable=False),
        sa.Column("vm_uuid", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("source_host", sa.String(length=255), nullable=False),
        sa.Column("planned_target", sa.String(length=255), nullable=False),
        sa.Column("target_host", sa.String(length=255), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("tuning", sa.String(length=32), nullable=False),
        sa.Column("predicted_total_s", sa.Float(), nullable=False),
        sa.Column("predicted_downtime_ms", sa.Float(), nullable=False),
        sa.Column("actual_total_s", sa.Float(), nullable=False),
        sa.Column("actual_downtime_ms", sa.Float(), nullable=False),
        sa.Column("tuning_applied", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("migration_ref", sa.Text(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["drain_id"], ["drains.id"]),
        sa.PrimaryKeyConstraint("drain_id", "vm_uuid"),
    )
    op.create_table(
        "steps",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("drain_id", sa.String(length=36), nullable=False),
        sa.Column("vm_uuid", sa.String(length=36), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("done_at", sa.Float(), nullable=True),
        sa.Column("result", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["drain_id"], ["drains.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_steps_drain_id", "steps", ["drain_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_steps_drain_id", table_name="steps")
    op.drop_table("steps")
    op.drop_table("drain_vms")
    op.drop_table("host_locks")
    op.drop_index("ix_drains_host", table_name="drains")
    op.drop_table("drains")
    op.drop_table("disabled_hosts")
