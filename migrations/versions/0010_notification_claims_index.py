"""the notification sweep's index on claims in flight

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29 06:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The sweep looks for claims past their deadline every few seconds: without this it read the whole
# notifications table, which only ever grows, each time.
INDEX = "ix_notifications_sending_claimed_until"


def upgrade() -> None:
    # CONCURRENTLY, outside the migration's transaction: deliverers and escalations write to this
    # table all the time. A build interrupted before left an invalid index of this name: build anew.
    with op.get_context().autocommit_block():
        op.drop_index(INDEX, table_name="notifications", postgresql_concurrently=True, if_exists=True)
        op.create_index(
            INDEX,
            "notifications",
            ["claimed_until"],
            postgresql_where=sa.text("status = 'SENDING'"),
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(INDEX, table_name="notifications", postgresql_concurrently=True, if_exists=True)
