"""Each drain VM's planned migration (its settings), so that a resumed drain keeps its plan.

Rows written before this revision get "": a coordinator resuming such a drain
plans again for the settings, as it did before.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("drain_vms") as batch:
        batch.add_column(sa.Column("planned", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("drain_vms") as batch:
        batch.drop_column("planned")
