"""API keys with roles, stored hashed; feedback says who sent it and whether it trains;
predictions keep their image's size

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("role", sa.Text, nullable=False),
        sa.Column("key_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    # one active key per name; a revoked key's name may be given again
    op.create_index("ux_api_keys_active_name", "api_keys", ["name"], unique=True, postgresql_where=sa.text("revoked_at IS NULL"))
    # a client's correction is a suggestion until a labeler's confirms it; rows from before keys trained
    op.add_column("feedback", sa.Column("kind", sa.Text, server_default="label", nullable=False))
    op.add_column("feedback", sa.Column("submitted_by", sa.Text, nullable=True))
    op.add_column("predictions", sa.Column("image_width", sa.Integer, nullable=True))
    op.add_column("predictions", sa.Column("image_height", sa.Integer, nullable=True))


def downgrade() -> None:
    op.drop_column("predictions", "image_height")
    op.drop_column("predictions", "image_width")
    op.drop_column("feedback", "submitted_by")
    op.drop_column("feedback", "kind")
    op.drop_table("api_keys")
