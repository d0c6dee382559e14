"""feedback's Idempotency-Key: a client's retry of a post that was stored returns the first answer

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("feedback", sa.Column("idempotency_key", sa.Text))
    op.create_index(
        "ux_feedback_idempotency",
        "feedback",
        ["submitted_by", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ux_feedback_idempotency", table_name="feedback")
    op.drop_column("feedback", "idempotency_key")
