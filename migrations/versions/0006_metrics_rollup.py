"""metrics rollup

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "metrics_rollup",
        sa.Column("id", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("escalations_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lateness_bounds", sa.ARRAY(sa.Double()), server_default=sa.text("'{}'"), nullable=False),
        sa.Column("lateness_counts", sa.ARRAY(sa.BigInteger()), server_default=sa.text("'{}'"), nullable=False),
        sa.Column("lateness_sum", sa.Double(), server_default=sa.text("0"), nullable=False),
        sa.Column("notifications_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivery_bounds", sa.ARRAY(sa.Double()), server_default=sa.text("'{}'"), nullable=False),
        sa.Column("sweep_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sweep_runs", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("sweep_handovers", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("sweep_redeliveries", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("escalations_due", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("escalations_overdue", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_metrics_rollup_one_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metrics_rollup")),
    )
    op.create_table(
        "metrics_rollup_notifications",
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("counts", sa.ARRAY(sa.BigInteger()), nullable=False),
        sa.Column("latency_sum", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("channel", "status", name=op.f("pk_metrics_rollup_notifications")),
    )
    op.create_index(
        "ix_escalations_executed_at",
        "escalations",
        ["executed_at"],
        unique=False,
        postgresql_where=sa.text("executed_at IS NOT NULL"),
    )
    op.create_index("ix_notifications_created_at", "notifications", ["created_at"], unique=False)
    # The counts start now, with nothing folded yet (the first sweep sets the bucket bounds). The
    # notifications' watermark stays before any notification still unsent: every row before it must
    # be final (models/metrics.py).
    op.execute(
        """
        INSERT INTO metrics_rollup (id, escalations_before, notifications_before)
        SELECT 1, now(), least(now(), min(created_at)) FROM notifications WHERE status IN ('PENDING', 'SENDING')
        """
    )


def downgrade() -> None:
    op.drop_index("ix_notifications_created_at", table_name="notifications")
    op.drop_index(
        "ix_escalations_executed_at",
        table_name="escalations",
        postgresql_where=sa.text("executed_at IS NOT NULL"),
    )
    op.drop_table("metrics_rollup_notifications")
    op.drop_table("metrics_rollup")
