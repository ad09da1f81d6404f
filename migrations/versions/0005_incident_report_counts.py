"""incident report counts

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 09:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "incidents", sa.Column("report_count", sa.Integer(), server_default=sa.text("1"), nullable=False)
    )
    op.add_column("incidents", sa.Column("last_reported_at", sa.DateTime(timezone=True), nullable=True))
    # Incidents reported again before this revision: each report is a timeline entry of its own, so
    # the counts come from there (the timeline itself is never rewritten).
    op.execute(
        """
        UPDATE incidents i SET report_count = 1 + r.reports, last_reported_at = r.last_at
        FROM (
            SELECT incident_id, count(*) AS reports, max(at) AS last_at FROM incident_events
            WHERE type = 'reported_again' GROUP BY incident_id
        ) r
        WHERE r.incident_id = i.id
        """
    )


def downgrade() -> None:
    op.drop_column("incidents", "last_reported_at")
    op.drop_column("incidents", "report_count")
