"""one export row per dataset version

Revision ID: 0008
Revises: 0007

A publish retried after its commit recorded its version a second time and moved the version's
feedback to the second row. The rows of each `dataset_dir` are merged into its first (its
feedback pointed back at it) before the unique constraint that keeps them one from now on.
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

FIRST_OF_EACH_VERSION = """
    SELECT id, min(id) OVER (PARTITION BY dataset_dir) AS first FROM dataset_exports
"""


def upgrade() -> None:
    op.execute(
        sa.text(
            f"UPDATE feedback SET export_id = later.first FROM ({FIRST_OF_EACH_VERSION}) AS later "
            "WHERE feedback.export_id = later.id AND later.id <> later.first"
        )
    )
    op.execute(
        sa.text(
            f"DELETE FROM dataset_exports USING ({FIRST_OF_EACH_VERSION}) AS later "
            "WHERE dataset_exports.id = later.id AND later.id <> later.first"
        )
    )
    op.create_unique_constraint("uq_dataset_exports_dataset_dir", "dataset_exports", ["dataset_dir"])


def downgrade() -> None:
    op.drop_constraint("uq_dataset_exports_dataset_dir", "dataset_exports", type_="unique")
