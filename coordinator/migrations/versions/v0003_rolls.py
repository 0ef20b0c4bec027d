"""Rolling maintenance: each roll and each of its hosts' steps (hook started, finished).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "rolls",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("request", sa.Text(), nullable=False),
        sa.Column("plan", sa.Text(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("abort_running", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "roll_hosts",
        sa.Column("roll_id", sa.String(length=36), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("step", sa.String(length=16), nullable=False),
        sa.Column("targets", sa.Text(), nullable=False),
        sa.Column("predicted_s", sa.Float(), nullable=False),
        sa.Column("drain_id", sa.String(length=36), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("hook_started_at", sa.Float(), nullable=True),
        sa.Column("hook_finished_at", sa.Float(), nullable=True),
        sa.Column("hook_exit_code", sa.Integer(), nullable=True),
        sa.Column("hook_output", sa.Text(), nullable=False),
        sa.Column("versions_before", sa.Text(), nullable=False),
        sa.Column("versions_after", sa.Text(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["roll_id"], ["rolls.id"]),
        sa.PrimaryKeyConstraint("roll_id", "host"),
    )


def downgrade() -> None:
    op.drop_table("roll_hosts")
    op.drop_table("rolls")
