"""the drift watch's score per prediction: labelers see the least familiar images first

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "drift_scores",
        sa.Column("prediction_id", sa.String(36), sa.ForeignKey("predictions.id"), primary_key=True),
        sa.Column("scored_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("witness", sa.Float, nullable=False),
        sa.Column("drifted", sa.Boolean, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("drift_scores")
