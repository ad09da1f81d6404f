"""tenant policies

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "tenant_policies",
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column(
            "body",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("version >= 1", name=op.f("ck_tenant_policies_version_positive")),
        sa.PrimaryKeyConstraint("tenant", "name", "version", name=op.f("pk_tenant_policies")),
    )
    # Nullable, no default: incidents escalated before keep their history as it was (a file policy).
    op.add_column("incidents", sa.Column("policy_version", sa.Integer(), nullable=True))
    # Incidents record the version they escalated by: a version is never deleted (DELETE
    # /policies/{name} sets deleted_at). forbid_change() comes from revision 0001.
    op.execute("""
        CREATE TRIGGER tenant_policies_never_deleted BEFORE DELETE ON tenant_policies
        FOR EACH ROW EXECUTE FUNCTION forbid_change()
    """)
    op.execute("""
        CREATE TRIGGER tenant_policies_never_truncated BEFORE TRUNCATE ON tenant_policies
        FOR EACH STATEMENT EXECUTE FUNCTION forbid_change()
    """)


def downgrade() -> None:
    op.execute("DROP TRIGGER tenant_policies_never_truncated ON tenant_policies")
    op.execute("DROP TRIGGER tenant_policies_never_deleted ON tenant_policies")
    op.drop_column("incidents", "policy_version")
    op.drop_table("tenant_policies")
