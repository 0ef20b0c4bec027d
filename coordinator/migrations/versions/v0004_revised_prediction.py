"""Each drain VM's prediction revised from its migration's own rounds, and why.

Rows written before this revision get 0 and "": no revision was made.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("drain_vms") as batch:
        batch.add_column(
            sa.Column("revised_total_s", sa.Float(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("revised_note", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("drain_vms") as batch:
        batch.drop_column("revised_note")
        batch.drop_column("revised_total_s")
