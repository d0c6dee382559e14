"""the indexes the labelers' review queue and the drift watch's window read

Revision ID: 0007
Revises: 0006

Built CONCURRENTLY (outside a transaction): the service keeps inserting predictions while a
deploy migrates, and a plain CREATE INDEX would hold its inserts for the whole build. A build that
failed half-way leaves an INVALID index behind, so each is dropped first when it is there.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

INDEXES = (  # name, table, columns, WHERE of a partial index
    # db.recent_predictions (the drift watch's window): newest first, read in index order
    ("ix_predictions_created_at", "predictions", [sa.text("created_at DESC"), "id"], None),
    # the queue's unsure predictions: probability below the configured threshold
    ("ix_predictions_probability", "predictions", ["probability"], None),
    # "no feedback row names this prediction yet" (an anti-join per unsure prediction)
    ("ix_feedback_prediction_id", "feedback", ["prediction_id"], "prediction_id IS NOT NULL"),
    # the queue's open suggestions, a sliver of feedback once labels are exported
    (
        "ix_feedback_open_suggestions",
        "feedback",
        ["id"],
        "kind = 'suggestion' AND export_id IS NULL AND quarantine_reason IS NULL",
    ),
)


def upgrade() -> None:
    with op.get_context().autocommit_block():
        for name, table, columns, where in INDEXES:
            op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)
            op.create_index(
                name,
                table,
                columns,
                postgresql_where=sa.text(where) if where else None,
                postgresql_concurrently=True,
            )


def downgrade() -> None:
    for name, table, _, _ in INDEXES:
        op.drop_index(name, table_name=table)
