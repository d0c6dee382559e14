"""Feedback storage (PostgreSQL + S3) and its export into dataset versions."""

import hashlib

import sqlalchemy as sa

from feedback import db
from feedback.export import publish, stage
from ml.data import read_classes, read_split
from ml.data.versions import current_dataset
from ml.validate import validate
from tests.support import photo_bytes, post_feedback


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


def test_export_builds_a_validated_version_with_the_corrections(live_settings):
    settings = live_settings
    base = settings.base_dataset_dir
    classes = read_classes(base)
    photo, other = photo_bytes(1), photo_bytes(2)
    post_feedback(settings, photo, classes[0])
    post_feedback(settings, photo, classes[2])  # the same image corrected again: the last label wins
    post_feedback(settings, other, classes[1])
    test_name, _ = read_split(base, "test")[0]
    post_feedback(settings, (base / "images" / test_name).read_bytes(), classes[3])  # would leak into the test score
    assert db.pending_count(db.engine(settings)) == 4

    staged = _stage_validate_publish(settings)

    version = current_dataset(settings)
    assert version == staged.target_dir and version.name == "v0001"
    train = dict(read_split(version, "train"))
    assert len(train) == len(read_split(base, "train")) + 2
    assert train[f"feedback_{hashlib.sha256(photo).hexdigest()[:16]}.jpg"] == 2
    assert train[f"feedback_{hashlib.sha256(other).hexdigest()[:16]}.jpg"] == 1
    assert read_split(version, "test") == read_split(base, "test")  # scores stay comparable
    assert staged.summary.skipped == [f"feedback:{staged.feedback_ids[-1]}: image is in the val/test split"]
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
