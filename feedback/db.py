"""Predictions and feedback in PostgreSQL (SQLAlchemy Core over psycopg2).

The schema is owned by the Alembic migrations in `feedback/migrations`; the tables below mirror
it for queries (a test compares the two with Alembic's autogenerate and finds no difference).
Rows are only ever inserted, and marked once a dataset version has consumed them.

Whoever starts or deploys the database migrates it, once: `python -m feedback up` or
`database_url(settings)` for the embedded cluster, `python -m feedback migrate` for a configured
one (compose's init job, the Kubernetes Job, `make up`). A service's engine never does.
"""

from __future__ import annotations

import uuid
from functools import cache
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy.dialects import postgresql

from config import Settings
from feedback import postgres

MIGRATIONS = Path(__file__).parent / "migrations"

# Declared again here as migration 0001 declares them, deliberately: a migration is history and
# never changes, these follow the newest schema (tests/code/test_feedback.py compares the two).
# `duplicates` pairs them, and these tables with each other: that is what column lists look like.
metadata = sa.MetaData()
LABEL, SUGGESTION = "label", "suggestion"
predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column("model_name", sa.Text, nullable=False),
    sa.Column("model_version", sa.Text, nullable=False),
    sa.Column("backend", sa.Text, nullable=False),
    sa.Column("label", sa.Text, nullable=False),
    sa.Column("probability", sa.Float, nullable=False),
    sa.Column("image_sha256", sa.String(64), nullable=False),
    sa.Column("image_key", sa.Text, nullable=False),
    sa.Column("image_width", sa.Integer),
    sa.Column("image_height", sa.Integer),
    sa.Index("ix_predictions_probability", "probability"),  # the review queue's unsure ones
)
# the newest first (recent_predictions: the drift watch's window), read in the index's order
sa.Index("ix_predictions_created_at", predictions.c.created_at.desc(), predictions.c.id)
dataset_exports = sa.Table(
    "dataset_exports",
    metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column("dataset_dir", sa.Text, nullable=False),
    sa.Column("num_samples", sa.Integer, nullable=False),
    sa.UniqueConstraint("dataset_dir", name="uq_dataset_exports_dataset_dir"),  # a version is recorded once
)
feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column("prediction_id", sa.String(36), sa.ForeignKey("predictions.id")),
    sa.Column("image_sha256", sa.String(64), nullable=False),
    sa.Column("image_key", sa.Text, nullable=False),
    sa.Column("predicted_label", sa.Text, nullable=False),
    sa.Column("corrected_label", sa.Text, nullable=False),
    sa.Column("user_id", sa.Text),
    sa.Column("export_id", sa.Integer, sa.ForeignKey("dataset_exports.id")),
    sa.Column("kind", sa.Text, server_default="label", nullable=False),  # LABEL trains; SUGGESTION waits for a labeler
    sa.Column("submitted_by", sa.Text),  # the API key's name
    sa.Column("quarantine_reason", sa.Text),  # why an ingest refused it; it waits for nobody then
    sa.Column("idempotency_key", sa.Text),  # the client's Idempotency-Key: one row per key and caller
    # the hourly count of pending feedback reads this index, not the table
    sa.Index("ix_feedback_pending", "id", postgresql_where=sa.text("export_id IS NULL")),
    # the review queue: whether a prediction has feedback yet, and the open suggestions
    sa.Index("ix_feedback_prediction_id", "prediction_id", postgresql_where=sa.text("prediction_id IS NOT NULL")),
    sa.Index(
        "ix_feedback_open_suggestions",
        "id",
        postgresql_where=sa.text("kind = 'suggestion' AND export_id IS NULL AND quarantine_reason IS NULL"),
    ),
    sa.Index(
        "ux_feedback_idempotency",
        "submitted_by",
        "idempotency_key",
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    ),
)
# The newest drift watch's score of each prediction it looked at (ml/drift.py: the MMD witness;
# higher is less like the training set), and whether that window drifted as a whole.
drift_scores = sa.Table(
    "drift_scores",
    metadata,
    sa.Column("prediction_id", sa.String(36), sa.ForeignKey("predictions.id"), primary_key=True),
    sa.Column("scored_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column("run_id", sa.Text, nullable=False),  # the MLflow run of the watch
    sa.Column("witness", sa.Float, nullable=False),
    sa.Column("drifted", sa.Boolean, nullable=False),
)

# The labelers' queue (feedback/review.py): an item ("s:<feedback id>", a client's suggestion, or
# "p:<prediction id>", an unsure prediction) is held by one labeler until `claimed_until`.
review_claims = sa.Table(
    "review_claims",
    metadata,
    sa.Column("item", sa.Text, primary_key=True),
    sa.Column("claimed_by", sa.Text, nullable=False),
    sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=False),
    sa.Column("decided_at", sa.DateTime(timezone=True)),
    sa.Column("decision", sa.Text),  # confirmed, corrected, or rejected: <why>
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("key_sha256", sa.String(64), nullable=False, unique=True),  # the key itself is never stored
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
    sa.Index("ux_api_keys_active_name", "name", unique=True, postgresql_where=sa.text("revoked_at IS NULL")),
)


# The logins besides the database's owner (who alone migrates), with only the rights their work
# uses: the Bento and its web app (rows, no DDL, the API keys read-only: a compromised service
# cannot mint an admin key), and the key administrator (`python -m feedback keys`: the keys, and
# the exports to read). The deploy creates them (postgres.create_role); `migrate` grants.
SERVICE_ROLE, KEYS_ROLE = postgres.SERVICE_ROLE, postgres.KEYS_ROLE
ROLE_GRANTS = {
    SERVICE_ROLE: (
        "SELECT, INSERT, UPDATE, DELETE ON predictions, feedback, review_claims",
        "SELECT ON dataset_exports, drift_scores, api_keys",
        "USAGE ON ALL SEQUENCES IN SCHEMA public",
    ),
    KEYS_ROLE: ("SELECT, INSERT, UPDATE ON api_keys", "SELECT ON dataset_exports, feedback", "USAGE ON SEQUENCE api_keys_id_seq"),
}


def migrate(url: str) -> None:
    """Bring the schema to the newest migration (a no-op when it is there already), then give
    the roles that exist their rights on it (again: a new table has none yet)."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url)
    command.upgrade(cfg, "head")
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            present = sa.text("SELECT rolname FROM pg_roles WHERE rolname = ANY(:names)")
            for role in conn.execute(present, {"names": list(ROLE_GRANTS)}).scalars():
                for grant in ROLE_GRANTS[role]:
                    conn.execute(sa.text(f"GRANT {grant} TO {role}"))
    finally:
        engine.dispose()


@cache
def migrate_once(url: str) -> str:
    """`migrate(url)` once per process (a failed one is tried again); returns `url`."""
    migrate(url)
    return url


def database_url(settings: Settings, *, start: bool = True) -> str:
    """The configured database (migrated by whoever deploys it: `python -m feedback migrate`), or
    the embedded cluster: started and migrated here when `start` is on (once per process), or with
    `start` off a LookupError saying how to start it."""
    if settings.feedback.database_url:
        return settings.feedback.database_url
    if start:
        return migrate_once(postgres.ensure_running(settings.postgres_dir, settings.feedback.postgres_port))
    if not postgres.is_running(settings.postgres_dir):
        raise LookupError(
            f"no feedback database: the embedded one ({settings.postgres_dir}) is not running and none is configured. "
            "`python -m feedback up` starts the embedded one; for `make up`'s stack, first run "
            '`eval "$(python -m stack env)"`'
        )
    return postgres.url(settings.postgres_dir, settings.feedback.postgres_port)


@cache
def engine_for(url: str, timeout_s: float = 5.0) -> sa.Engine:
    """A pooled engine whose every wait is bounded by `timeout_s`: the connection, each statement
    and a wait for a free pooled connection (an outage then fails fast, as
    `sa.exc.OperationalError` or the pool's `sa.exc.TimeoutError`, instead of hanging). No I/O
    here: it connects on first use, and never migrates (whoever deploys the database does), so a
    service starts while its database is down."""
    return sa.create_engine(
        url,
        pool_size=10,
        max_overflow=20,
        pool_pre_ping=True,
        pool_timeout=timeout_s,
        connect_args={
            "connect_timeout": max(1, round(timeout_s)),
            "options": f"-c statement_timeout={round(timeout_s * 1000)}",
        },
    )


def engine(settings: Settings) -> sa.Engine:
    """The configured database's engine, one per URL and process."""
    return engine_for(database_url(settings), settings.feedback.storage_timeout_s)


def record_prediction(db: sa.Engine, **columns: str | float) -> str:
    """Insert a prediction (every column of `predictions` but `id`, by name); returns its new id."""
    prediction_id = str(uuid.uuid4())
    with db.begin() as conn:
        conn.execute(predictions.insert(), {"id": prediction_id, **columns})  # one cached statement for all
    return prediction_id


def ping(db: sa.Engine) -> None:
    """Raises when the database does not answer."""
    with db.connect() as conn:
        conn.execute(sa.text("SELECT 1"))


def get_prediction(db: sa.Engine, prediction_id: str) -> sa.Row | None:
    with db.connect() as conn:
        return conn.execute(sa.select(predictions).where(predictions.c.id == prediction_id)).first()


def feedback_sent_by(db: sa.Engine, submitted_by: str, limit: int = 100) -> list[sa.Row]:
    """The newest feedback one key sent, with the dataset version that took it in (if any)."""
    query = (
        sa.select(feedback, dataset_exports.c.dataset_dir)
        .outerjoin(dataset_exports, feedback.c.export_id == dataset_exports.c.id)
        .where(feedback.c.submitted_by == submitted_by)
        .order_by(feedback.c.id.desc())
        .limit(limit)
    )
    with db.connect() as conn:
        return list(conn.execute(query))


RECEIPT = (feedback.c.id, feedback.c.image_key, feedback.c.kind)  # what the service answers with


def record_feedback(db: sa.Engine, **columns: str | None) -> sa.Row:
    """Insert feedback (the columns of `feedback` a user sends, by name); returns its receipt. With
    an `idempotency_key` its caller used before, nothing is inserted and the first receipt is
    returned: concurrent retries store one row (the unique index decides, not a lookup)."""
    insert = postgresql.insert(feedback).values(**columns)
    if columns.get("idempotency_key") is not None:
        insert = insert.on_conflict_do_nothing(
            index_elements=["submitted_by", "idempotency_key"], index_where=feedback.c.idempotency_key.isnot(None)
        )
    with db.begin() as conn:
        row = conn.execute(insert.returning(*RECEIPT)).first()
    return row or feedback_with_key(db, columns["submitted_by"], columns["idempotency_key"])


def feedback_with_key(db: sa.Engine, submitted_by: str, idempotency_key: str) -> sa.Row | None:
    """The receipt of the feedback a caller sent with this Idempotency-Key, if any."""
    query = sa.select(*RECEIPT).where(feedback.c.submitted_by == submitted_by, feedback.c.idempotency_key == idempotency_key)
    with db.connect() as conn:
        return conn.execute(query).first()


def _pending(agreement: int | None) -> sa.ColumnElement[bool]:
    """What the next dataset version takes: unconsumed, unquarantined labels, and with
    `agreement`, suggestions that many distinct keys made alike (same image, same species)."""
    trainable = feedback.c.kind == LABEL
    if agreement:
        agreed = (
            sa.select(feedback.c.image_sha256, feedback.c.corrected_label)
            .where(feedback.c.kind == SUGGESTION, feedback.c.export_id.is_(None))
            .group_by(feedback.c.image_sha256, feedback.c.corrected_label)
            .having(sa.func.count(sa.distinct(feedback.c.submitted_by)) >= agreement)
        )
        trainable = sa.or_(trainable, sa.tuple_(feedback.c.image_sha256, feedback.c.corrected_label).in_(agreed))
    return sa.and_(feedback.c.export_id.is_(None), feedback.c.quarantine_reason.is_(None), trainable)


def pending_count(db: sa.Engine, agreement: int | None = None) -> int:
    """Trainable rows waiting: what the ingest threshold counts (a lone suggestion does not)."""
    with db.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(feedback).where(_pending(agreement))).scalar_one()


def pending_feedback(db: sa.Engine, agreement: int | None = None) -> list[sa.Row]:
    """Trainable rows no dataset version has consumed yet, oldest first."""
    with db.connect() as conn:
        return list(conn.execute(sa.select(feedback).where(_pending(agreement)).order_by(feedback.c.id)))


def quarantine(db: sa.Engine, reasons: dict[int, str]) -> None:
    """Take these rows out of the pending ones, each with why."""
    with db.begin() as conn:
        for feedback_id, reason in reasons.items():
            conn.execute(feedback.update().where(feedback.c.id == feedback_id).values(quarantine_reason=reason))


def quarantined(db: sa.Engine) -> list[sa.Row]:
    with db.connect() as conn:
        return list(conn.execute(sa.select(feedback).where(feedback.c.quarantine_reason.is_not(None)).order_by(feedback.c.id)))


def exports(db: sa.Engine) -> list[sa.Row]:
    with db.connect() as conn:
        return list(conn.execute(sa.select(dataset_exports).order_by(dataset_exports.c.id)))


def mark_exported(db: sa.Engine, feedback_ids: list[int], dataset_dir: Path, num_samples: int) -> int:
    """Record a published dataset version and the feedback it consumed, in one transaction;
    returns the export id. A version is recorded once (the unique `dataset_dir` decides, also
    between concurrent publishes): recorded again with the same feedback, by a publish retried
    after its commit, it returns the first record's id; with other feedback, it raises
    FileExistsError (another publish took that version's name)."""
    insert = postgresql.insert(dataset_exports).values(dataset_dir=str(dataset_dir), num_samples=num_samples)
    with db.begin() as conn:
        export_id = conn.execute(
            insert.on_conflict_do_nothing(index_elements=["dataset_dir"]).returning(dataset_exports.c.id)
        ).scalar()
        if export_id is not None:
            conn.execute(feedback.update().where(feedback.c.id.in_(feedback_ids)).values(export_id=export_id))
            return export_id
        export_id = conn.execute(_recorded(dataset_dir)).scalar_one()
        consumed = conn.execute(sa.select(feedback.c.id).where(feedback.c.export_id == export_id)).scalars().all()
    if sorted(consumed) != sorted(feedback_ids):
        raise FileExistsError(f"{dataset_dir} is recorded by another publish (export {export_id}); stage again")
    return export_id


def _recorded(dataset_dir: Path) -> sa.Select:
    return sa.select(dataset_exports.c.id).where(dataset_exports.c.dataset_dir == str(dataset_dir))


def export_of(db: sa.Engine, dataset_dir: Path) -> int | None:
    """The id of the export that recorded the dataset version at `dataset_dir`, if any."""
    with db.connect() as conn:
        return conn.execute(_recorded(dataset_dir)).scalar()


def feedback_in_dataset(db: sa.Engine, dataset_dir: str) -> int | None:
    """How many feedback rows the dataset version at `dataset_dir` holds, its predecessors' too
    (each version is built on the one before); None for a version not built from feedback."""
    with db.connect() as conn:
        export_id = conn.execute(sa.select(dataset_exports.c.id).where(dataset_exports.c.dataset_dir == dataset_dir)).scalar()
        if export_id is None:
            return None
        return conn.execute(sa.select(sa.func.count()).where(feedback.c.export_id <= export_id)).scalar_one()


def recent_predictions(db: sa.Engine, limit: int) -> list[sa.Row]:
    """The newest `limit` predictions, newest first."""
    query = sa.select(predictions).order_by(predictions.c.created_at.desc(), predictions.c.id).limit(limit)
    with db.connect() as conn:
        return list(conn.execute(query))


def record_drift(db: sa.Engine, run_id: str, witness: dict[str, float], drifted: bool) -> None:
    """Each prediction's newest drift score (a later watch overwrites an earlier one's)."""
    if not witness:
        return
    rows = [{"prediction_id": key, "run_id": run_id, "witness": value, "drifted": drifted} for key, value in witness.items()]
    insert = postgresql.insert(drift_scores).values(rows)
    newest = {column: insert.excluded[column] for column in ("run_id", "witness", "drifted")}
    with db.begin() as conn:
        conn.execute(insert.on_conflict_do_update(index_elements=["prediction_id"], set_={**newest, "scored_at": sa.func.now()}))


def most_drifted(db: sa.Engine, limit: int) -> list[sa.Row]:
    """Predictions by drift score, least like the training set first: the labelers' order."""
    query = (
        sa.select(predictions.c.id, predictions.c.image_key, drift_scores.c.witness, drift_scores.c.drifted)
        .join(drift_scores, drift_scores.c.prediction_id == predictions.c.id)
        .order_by(drift_scores.c.witness.desc())
        .limit(limit)
    )
    with db.connect() as conn:
        return list(conn.execute(query))
