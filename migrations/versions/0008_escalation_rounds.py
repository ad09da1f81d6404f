"""escalation rounds (policy `repeat`), acknowledgement timers (`ack_timeout`), escalate now

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
    # escalation so far was a level of the first round, every snapshot so far repeated nothing and
    # let acknowledgements last.
    op.add_column("escalations", sa.Column("round", sa.Integer(), server_default=sa.text("1"), nullable=False))
    op.add_column(
        "escalations",
        sa.Column(
            "kind",
            sa.Enum("level", "ack_timeout", name="escalation_kind", native_enum=False, create_constraint=True,
                    length=32),
            server_default="level",
            nullable=False,
        ),
    )  # fmt: skip
    op.add_column(
        "incidents", sa.Column("policy_repeat", sa.Integer(), server_default=sa.text("0"), nullable=False)
    )
    op.add_column(
        "incidents", sa.Column("rounds_repeated", sa.Integer(), server_default=sa.text("0"), nullable=False)
    )
    op.add_column("incidents", sa.Column("policy_ack_timeout_ms", sa.Integer(), nullable=True))
    # Escalate now: a level paged by a responder, who, and the levels it skipped.
    op.add_column(
        "escalations", sa.Column("manual", sa.Boolean(), server_default=sa.false(), nullable=False)
    )
    op.add_column("escalations", sa.Column("actor", sa.Uuid(), nullable=True))
    op.add_column("escalations", sa.Column("reason", sa.Text(), nullable=True))
    # A level runs once per round: the rule that kept it to once per incident now counts rounds.
    op.create_unique_constraint(
        "uq_escalations_incident_id_round_escalation_level",
        "escalations",
        ["incident_id", "round", "escalation_level"],
    )
    op.drop_constraint("uq_escalations_incident_id_escalation_level", "escalations", type_="unique")


def downgrade() -> None:
    # Escalations are never deleted, and a second round (or a timer) cannot be told apart from the
    # first round's levels without these columns: refuse rather than lose what happened.
    repeated = op.get_bind().scalar(
        sa.text("SELECT count(*) FROM escalations WHERE round > 1 OR kind <> 'level'")
    )
    if repeated:
        raise RuntimeError(
            f"{repeated} escalation(s) of a later round would lose their round: not downgrading"
        )
    op.create_unique_constraint(
        "uq_escalations_incident_id_escalation_level", "escalations", ["incident_id", "escalation_level"]
    )
    op.drop_constraint("uq_escalations_incident_id_round_escalation_level", "escalations", type_="unique")
    op.drop_column("escalations", "reason")
    op.drop_column("escalations", "actor")
    op.drop_column("escalations", "manual")
    op.drop_column("incidents", "policy_ack_timeout_ms")
    op.drop_column("incidents", "rounds_repeated")
    op.drop_column("incidents", "policy_repeat")
    op.drop_column("escalations", "kind")
    op.drop_column("escalations", "round")
