"""Feedback storage (PostgreSQL + S3) and its export into dataset versions."""

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import boto3
import pytest
import sqlalchemy as sa
from botocore.exceptions import ClientError
from PIL import Image

from config import REPO_ROOT
from feedback import db, postgres
from feedback.export import finish_interrupted_publish, publish, stage
from ml.data import read_classes, read_split
from ml.data.versions import current_dataset
from ml.validate import validate
from tests.support import free_port, photo_bytes, post_feedback


def _stage_validate_publish(settings):
    staged = stage(settings)
    validate(settings, dataset_dir=staged.staging_dir, out_dir=settings.work_dir / "validation")
    publish(
        settings, staged.staging_dir, staged.target_dir, staged.feedback_ids, staged.summary.added + staged.summary.relabelled
    )
    return staged


def test_the_tables_queried_are_the_tables_the_migrations_create(postgres_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    db.migrate(postgres_url)
    with sa.create_engine(postgres_url).connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), db.metadata) == []


def test_migrations_are_idempotent(postgres_url):
    db.migrate(postgres_url)
    db.migrate(postgres_url)
    tables = sa.inspect(sa.create_engine(postgres_url)).get_table_names()
    assert {"predictions", "feedback", "dataset_exports", "alembic_version"} <= set(tables)


@pytest.fixture
def fresh_database(postgres_url):
    """A database of this test's own on the tests' server, empty (no schema yet), dropped after:
    its rows disturb no other test."""
    name = f"fresh_{os.urandom(6).hex()}"
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    try:
        yield sa.make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE {name} WITH (FORCE)"))  # and the connections left to it
        admin.dispose()


def test_an_engine_never_migrates_nor_needs_its_database_up(fresh_database, postgres_url):
    """Every service worker builds an engine; whoever deploys the database migrates it, once."""
    engine = db.engine_for(fresh_database)
    with engine.connect() as conn:
        assert sa.inspect(conn).get_table_names() == []
    down = sa.make_url(postgres_url).set(port=1).render_as_string(hide_password=False)  # nothing listens there
    db.engine_for(down, timeout_s=1.0)  # no I/O: a worker starts while its database is down


def test_feedback_migrate_migrates_the_configured_database_and_starts_none(fresh_database, tmp_path):
    def migrate(**env: str) -> subprocess.CompletedProcess:
        environment = {k: v for k, v in os.environ.items() if k != "INSECT_FEEDBACK__DATABASE_URL"}
        environment.update(INSECT_DATA_DIR=str(tmp_path / "data"), **env)
        command = [sys.executable, "-m", "feedback", "migrate"]
        return subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, check=False)

    done = migrate()  # none configured, the embedded one not running: says so, starts nothing
    assert done.returncode == 1 and "no feedback database" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "data" / "postgres").exists()
    done = migrate(INSECT_FEEDBACK__DATABASE_URL=fresh_database)
    assert done.returncode == 0, done.stderr
    assert sa.make_url(fresh_database).password not in done.stdout + done.stderr
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = sa.create_engine(fresh_database)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), db.metadata) == []  # the newest schema
    engine.dispose()


def test_the_embedded_cluster_is_migrated_once_per_process_by_whoever_starts_it(settings, monkeypatch):
    directory = Path(tempfile.mkdtemp(prefix="insect-pg-"))  # /tmp: as root the server runs as `postgres`
    os.chmod(directory, 0o755)
    monkeypatch.setattr(settings, "data_dir", directory)
    monkeypatch.setattr(settings.feedback, "database_url", None)
    monkeypatch.setattr(settings.feedback, "postgres_port", free_port())
    migrations = []
    monkeypatch.setattr(db, "migrate", lambda url, migrate=db.migrate: migrations.append(url) or migrate(url))
    engine = None
    try:
        url = db.database_url(settings)  # started here, and migrated
        engine = db.engine(settings)  # a worker asking again: started already, migrated already
        assert db.database_url(settings) == url == engine.url.render_as_string(hide_password=False)
        assert migrations == [url]
        with engine.connect() as conn:
            assert {"predictions", "feedback", "api_keys", "review_claims"} <= set(sa.inspect(conn).get_table_names())
    finally:
        if engine is not None:
            engine.dispose()
        postgres.stop(settings.postgres_dir)
        shutil.rmtree(directory, ignore_errors=True)


def _plan_nodes(plan: dict):
    yield plan
    for child in plan.get("Plans", []):
        yield from _plan_nodes(child)


def test_the_review_queue_and_recent_predictions_read_indexes_not_whole_tables(fresh_database):
    """On tens of thousands of rows shaped as in use (few predictions unsure, most feedback
    exported labels, a few open suggestions), the queries review.claim_next, review.progress and
    db.recent_predictions send are planned over the queue's indexes: no sequential scan of
    predictions or feedback, which grow with every request."""
    db.migrate(fresh_database)
    engine = sa.create_engine(fresh_database)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO dataset_exports (dataset_dir, num_samples) VALUES ('v0001', 1)"))
        conn.execute(
            sa.text("""
            INSERT INTO predictions (id, created_at, model_name, model_version, backend, label, probability,
                                     image_sha256, image_key)
            SELECT md5(i::text), now() - i * interval '1 minute', 'insect-classifier', '1', 'torch', 'rice leaf roller',
                   CASE WHEN i % 800 < 2 THEN (i % 45) / 100.0 ELSE 0.5 + (i % 997) / 2000.0 END,
                   md5(i::text) || md5(i::text), 'predictions/' || i || '.png'
            FROM generate_series(1, 40000) AS i""")
        )
        # feedback on three predictions in four (half the unsure ones), nine labels in ten exported,
        # one row in 300 an open suggestion
        conn.execute(
            sa.text("""
            INSERT INTO feedback (prediction_id, image_sha256, image_key, predicted_label, corrected_label, kind, export_id)
            SELECT md5(i::text), md5(i::text) || md5(i::text), 'feedback/' || i || '.png', 'rice leaf roller',
                   'paddy stem maggot', CASE WHEN i % 400 = 1 THEN 'suggestion' ELSE 'label' END,
                   CASE WHEN i % 400 = 1 OR i % 10 = 3 THEN NULL ELSE 1 END
            FROM generate_series(1, 40000) AS i WHERE i % 4 <> 0""")
        )
        conn.execute(
            sa.text("""
            INSERT INTO drift_scores (prediction_id, run_id, witness, drifted)
            SELECT md5(i::text), 'run', (i % 13) / 13.0, false FROM generate_series(1, 2000) AS i""")
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE"))  # as autovacuum leaves them: statistics, visibility map

    sent = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def keep(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT") and "predictions" in statement:
            sent.append((statement, parameters))

    from feedback import review

    assert review.claim_next(engine, "ann", unsure_below=0.5, hold_s=600) is not None
    assert review.progress(engine, "ann", unsure_below=0.5)[1] > 0
    assert len(db.recent_predictions(engine, 50)) == 50
    assert len(sent) == 3, [statement for statement, _ in sent]

    used = []
    with engine.connect() as conn:
        for statement, parameters in sent:
            [plan] = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters).scalar_one()
            nodes = list(_plan_nodes(plan["Plan"]))
            scanned = [n["Relation Name"] for n in nodes if n["Node Type"] == "Seq Scan"]
            assert not {"predictions", "feedback"} & set(scanned), f"sequential scans of {scanned}: {statement}"
            used.append({n["Index Name"] for n in nodes if "Index Name" in n})
    engine.dispose()
    queue = {"ix_predictions_probability", "ix_feedback_prediction_id", "ix_feedback_open_suggestions"}
    claim, left, recent = used
    assert queue <= claim and queue <= left, used
    assert "ix_predictions_created_at" in recent, used


def test_export_builds_a_validated_version_with_the_corrections(live_settings):
    settings = live_settings
    base = settings.base_dataset_dir
    classes = read_classes(base)
    photo, other = photo_bytes(1), photo_bytes(2)
    post_feedback(settings, photo, classes[0])
    post_feedback(settings, photo, classes[2])  # the same image corrected again: the last label wins
    post_feedback(settings, other, classes[1])
    test_name, _ = read_split(base, "test")[0]
    leak = post_feedback(settings, (base / "images" / test_name).read_bytes(), classes[3])  # would leak into the test score
    assert db.pending_count(db.engine(settings)) == 4

    staged = _stage_validate_publish(settings)

    version = current_dataset(settings)
    assert version == staged.target_dir and version.name == "v0001"
    train = dict(read_split(version, "train"))
    assert len(train) == len(read_split(base, "train")) + 2
    assert train[f"feedback_{hashlib.sha256(photo).hexdigest()[:16]}.jpg"] == 2
    assert train[f"feedback_{hashlib.sha256(other).hexdigest()[:16]}.jpg"] == 1
    assert read_split(version, "test") == read_split(base, "test")  # scores stay comparable
    assert staged.summary.skipped == [] and [row.id for row in db.quarantined(db.engine(settings))] == [leak]
    assert "source" in (version / "samples.csv").read_text()
    assert db.pending_count(db.engine(settings)) == 0


def test_the_next_export_builds_on_the_previous_version(live_settings):
    settings = live_settings
    classes = read_classes(settings.base_dataset_dir)
    post_feedback(settings, photo_bytes(3), classes[0])
    first = _stage_validate_publish(settings)
    post_feedback(settings, photo_bytes(4), classes[1])
    second = _stage_validate_publish(settings)
    assert second.parent_dir == first.target_dir
    assert len(read_split(second.target_dir, "train")) == len(read_split(first.target_dir, "train")) + 1
    assert len((second.target_dir / "samples.csv").read_text().splitlines()) == 3  # header + both samples


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.effect_noise((width, height), 50).convert("RGB").save(out, format="PNG")
    return out.getvalue()


def _reencoded_test_image(dataset) -> bytes:
    name, _ = read_split(dataset, "test")[0]
    out = io.BytesIO()
    Image.open(dataset / "images" / name).save(out, format="JPEG", quality=60)
    return out.getvalue()


def test_bad_rows_are_quarantined_with_their_reasons_and_the_good_ones_publish(live_settings):
    settings = live_settings
    base, engine = settings.base_dataset_dir, db.engine(settings)
    species = read_classes(base)[0]
    good = [post_feedback(settings, photo_bytes(40 + i), species) for i in range(2)]
    bad = {
        post_feedback(settings, _png(1, 1), species): "1x1 px",
        post_feedback(settings, _png(12_000, 20), species): "12000x20 px",
        post_feedback(settings, photo_bytes(50), "dragon"): "unknown species",
        post_feedback(settings, _reencoded_test_image(base), species): "near-duplicate of a val/test image",
    }
    staged = _stage_validate_publish(settings)  # the suite passes: no bad row reached the version

    assert staged.feedback_ids == good and len(read_split(staged.target_dir, "train")) == len(read_split(base, "train")) + 2
    reasons = {row.id: row.quarantine_reason for row in db.quarantined(engine)}
    assert set(reasons) == set(bad) and all(fragment in reasons[i] for i, fragment in bad.items())
    assert db.pending_count(engine) == 0
    listed = subprocess.run(
        [sys.executable, "-m", "feedback", "quarantined"],
        env={**os.environ, "INSECT_FEEDBACK__DATABASE_URL": settings.feedback.database_url},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    ).stdout
    assert all(f"feedback {i} " in listed for i in bad)


def test_an_ingest_killed_between_recording_and_moving_the_version_is_finished_by_the_next(live_settings, monkeypatch):
    settings = live_settings
    ids = [post_feedback(settings, photo_bytes(60 + i), read_classes(settings.base_dataset_dir)[1]) for i in range(2)]
    staged = stage(settings)
    validate(settings, dataset_dir=staged.staging_dir, out_dir=settings.work_dir / "validation")

    def killed(self, target):
        raise KeyboardInterrupt("killed after the database committed")

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(Path, "rename", killed)
        publish(settings, staged.staging_dir, staged.target_dir, staged.feedback_ids, 2)
    assert not staged.target_dir.exists() and db.pending_count(db.engine(settings)) == 0  # recorded, not in place

    assert finish_interrupted_publish(settings) == [staged.target_dir]
    assert current_dataset(settings) == staged.target_dir
    versions = [export for export in db.exports(db.engine(settings)) if export.dataset_dir == str(staged.target_dir)]
    assert len(versions) == 1
    with db.engine(settings).connect() as conn:
        consumed = conn.execute(sa.select(db.feedback.c.export_id).where(db.feedback.c.id.in_(ids))).scalars().all()
    assert consumed == [versions[0].id] * 2
    assert finish_interrupted_publish(settings) == []  # nothing left to finish


def test_the_review_queue_gives_two_labelers_two_items_decides_once_and_lets_a_lapsed_hold_go(live_settings):
    from concurrent.futures import ThreadPoolExecutor

    from feedback import review

    engine = db.engine(live_settings)
    unsure = 0.0  # no prediction is that unsure: the queue holds this test's suggestions only
    with engine.begin() as conn:  # earlier tests' claims and suggestions are not this queue's
        conn.execute(db.review_claims.delete())
    run = os.urandom(3).hex()
    suggested = [
        post_feedback(live_settings, photo_bytes(i), "rice leaf roller", kind=db.SUGGESTION, submitted_by=f"c-{run}")
        for i in range(4)
    ]
    newest_first = [f"s:{i}" for i in reversed(suggested)]

    with ThreadPoolExecutor(2) as pool:  # two labelers ask at the same moment
        items = list(pool.map(lambda name: review.claim_next(engine, name, unsure, hold_s=600), [f"ann-{run}", f"bob-{run}"]))
    assert {item.key for item in items} == set(newest_first[:2])  # two items, never the same one
    assert review.claim_next(engine, f"ann-{run}", unsure, hold_s=600).key == items[0].key  # a reload shows ann her item

    first = items[0]
    assert review.decide(engine, first.key, f"ann-{run}", review.CONFIRMED, first.suggestion) == review.CONFIRMED
    assert review.decide(engine, first.key, f"ann-{run}", review.CONFIRMED, first.suggestion) == review.CONFIRMED
    labels = [row for row in db.pending_feedback(engine) if row.submitted_by == f"ann-{run}"]
    assert len(labels) == 1 and labels[0].corrected_label == "rice leaf roller"  # decided once, and it trains
    with pytest.raises(PermissionError):
        review.decide(engine, items[1].key, f"ann-{run}", review.CONFIRMED, "rice leaf roller")  # bob's, not ann's

    assert review.decide(engine, items[1].key, f"bob-{run}", "not-an-insect") == "rejected: not an insect"
    rejected = int(items[1].key.removeprefix("s:"))
    assert any(row.id == rejected and "not an insect" in row.quarantine_reason for row in db.quarantined(engine))

    lapsed = review.claim_next(engine, f"ann-{run}", unsure, hold_s=0)  # held for no time at all
    assert review.claim_next(engine, f"bob-{run}", unsure, hold_s=600).key == lapsed.key
    assert review.progress(engine, f"ann-{run}", unsure) == (1, 1)  # ann decided one; bob holds one, one is free


def test_the_tests_s3_server_lets_in_only_its_iam_users_keys(s3_endpoint):
    """As AWS: an unknown key and a known key with a wrong secret are refused (403)."""
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="keys-checked")
    for key_id, secret in (("test", "test"), (os.environ["AWS_ACCESS_KEY_ID"], "not-the-secret")):
        stranger = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=key_id, aws_secret_access_key=secret)
        with pytest.raises(ClientError) as refused:
            stranger.list_objects_v2(Bucket="keys-checked")
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
