"""escalations: one row per level, never deleted

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "escalations",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("incident_id", sa.Uuid(), nullable=False),
        sa.Column("escalation_level", sa.Integer(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "PENDING",
                "EXECUTED",
                "CANCELLED",
                name="escalation_status",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column(
            "notify",
            sa.JSON().with_variant(
                postgresql.JSONB(astext_type=sa.Text()), "postgresql"
            ),
            nullable=False,
        ),
        sa.Column("scheduled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("executed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("task_id", sa.String(length=64), nullable=True),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["incident_id"],
            ["incidents.id"],
            name=op.f("fk_escalations_incident_id_incidents"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_escalations")),
        sa.UniqueConstraint(
            "incident_id",
            "escalation_level",
            name=op.f("uq_escalations_incident_id_escalation_level"),
        ),
    )
    op.create_index(
        "ix_escalations_pending_scheduled_at",
        "escalations",
        ["scheduled_at"],
        unique=False,
        postgresql_where=sa.text("status = 'PENDING'"),
    )
    # Escalations are the audit record: finished rows are kept forever, never deleted.
    op.execute("""
        CREATE TRIGGER escalations_never_deleted BEFORE DELETE ON escalations
        FOR EACH ROW EXECUTE FUNCTION forbid_change()
    """)
    op.execute("""
        CREATE TRIGGER escalations_never_truncated BEFORE TRUNCATE ON escalations
        FOR EACH STATEMENT EXECUTE FUNCTION forbid_change()
    """)


def downgrade() -> None:
    op.execute("DROP TRIGGER escalations_never_truncated ON escalations")
    op.execute("DROP TRIGGER escalations_never_deleted ON escalations")
    op.drop_index(
        "ix_escalations_pending_scheduled_at",
        table_name="escalations",
        postgresql_where=sa.text("status = 'PENDING'"),
    )
    op.drop_table("escalations")
