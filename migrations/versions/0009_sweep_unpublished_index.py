"""the sweep's index on escalations never handed to the broker

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28 15:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ix_escalations_unpublished_scheduled_at"
WHERE = sa.text("status = 'PENDING' AND published_at IS NULL")


def _drop() -> None:
    op.drop_index(NAME, table_name="escalations", postgresql_concurrently=True, if_exists=True)


def upgrade() -> None:
    # Built CONCURRENTLY (outside the migration's transaction): escalations is the busiest table,
    # and a plain CREATE INDEX would hold every escalate and every execution for the build.
    with op.get_context().autocommit_block():
        # A build interrupted before left an invalid index of this name behind: start again.
        _drop()
        op.create_index(
            NAME,
            "escalations",
            ["scheduled_at"],
            unique=False,
            postgresql_where=WHERE,
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        _drop()
