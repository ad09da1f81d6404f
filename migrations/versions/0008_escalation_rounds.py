"""escalation rounds (policy `repeat`)

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 12:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Constant defaults: Postgres records them in the catalogue, and no row is rewritten. Every
    # escalation so far was of the first round, every snapshot so far repeated nothing.
    op.add_column("escalations", sa.Column("round", sa.Integer(), server_default=sa.text("1"), nullable=False))
    op.add_column(
        "incidents", sa.Column("policy_repeat", sa.Integer(), server_default=sa.text("0"), nullable=False)
    )
    # A level runs once per round: the rule that kept it to once per incident now counts rounds.
    op.create_unique_constraint(
        "uq_escalations_incident_id_round_escalation_level",
        "escalations",
        ["incident_id", "round", "escalation_level"],
    )
    op.drop_constraint("uq_escalations_incident_id_escalation_level", "escalations", type_="unique")


def downgrade() -> None:
    # Escalations are never deleted, and a second round cannot be told apart from the first without
    # its column: refuse rather than lose what happened.
    repeated = op.get_bind().scalar(sa.text("SELECT count(*) FROM escalations WHERE round > 1"))
    if repeated:
        raise RuntimeError(
            f"{repeated} escalation(s) of a repeated round would lose their round: not downgrading"
        )
    op.create_unique_constraint(
        "uq_escalations_incident_id_escalation_level", "escalations", ["incident_id", "escalation_level"]
    )
    op.drop_constraint("uq_escalations_incident_id_round_escalation_level", "escalations", type_="unique")
    op.drop_column("incidents", "policy_repeat")
    op.drop_column("escalations", "round")
