"""predictions, feedback and the dataset exports that consumed it

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

NOW = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.Column("model_name", sa.Text, nullable=False),
        sa.Column("model_version", sa.Text, nullable=False),
        sa.Column("backend", sa.Text, nullable=False),
        sa.Column("label", sa.Text, nullable=False),
        sa.Column("probability", sa.Float, nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("image_key", sa.Text, nullable=False),
    )
    op.create_table(
        "dataset_exports",
        sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.Column("dataset_dir", sa.Text, nullable=False),
        sa.Column("num_samples", sa.Integer, nullable=False),
    )
    op.create_table(
        "feedback",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.Column("prediction_id", sa.String(36), sa.ForeignKey("predictions.id"), nullable=True),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("image_key", sa.Text, nullable=False),
        sa.Column("predicted_label", sa.Text, nullable=False),
        sa.Column("corrected_label", sa.Text, nullable=False),
        sa.Column("user_id", sa.Text, nullable=True),
        sa.Column("export_id", sa.Integer, sa.ForeignKey("dataset_exports.id"), nullable=True),
    )
    op.create_index("ix_feedback_pending", "feedback", ["id"], postgresql_where=sa.text("export_id IS NULL"))


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_table("dataset_exports")
    op.drop_table("predictions")
