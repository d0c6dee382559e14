"""Dataset versions are immutable once built: read-only, sealed with every file's sha256, checked
again by validation and training; their publish records each version once, however often it is
retried after a crash."""

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import types
from collections import defaultdict
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from PIL import Image

from config import REPO_ROOT
from dags.assets import TRAINING_DATASET
from feedback import db
from feedback.export import publish, stage
from ml.data import read_classes, read_split
from ml.data.synthetic import user_photos
from ml.data.versions import CHECKSUMS, Sample, TamperedVersionError, build_version, current_dataset
from ml.train import train
from ml.validate import DataValidationError, validate
from tests.support import photo_bytes, post_feedback


def _samples(count: int, label: str) -> list[Sample]:
    photos = []
    for i in range(count):
        out = io.BytesIO()
        next(user_photos(1, 1, 32, seed=i))[0].save(out, format="JPEG")
        photos.append(Sample(hashlib.sha256(out.getvalue()).hexdigest(), label, out.getvalue(), f"feedback:{i}"))
    return photos


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _tamper(image: Path) -> None:
    """What an edit in place takes once the file is read-only: a chmod, then the write."""
    image.chmod(0o644)
    with Image.open(image) as original:
        edited = original.convert("RGB")
    edited.putpixel((0, 0), (255, 0, 255))
    edited.save(image, format="JPEG", quality=95)


def test_a_version_is_read_only_sealed_and_linked_only_to_a_sealed_parent(tiny_dataset, tmp_path):
    label = read_classes(tiny_dataset)[0]
    base_image = tiny_dataset / "images" / read_split(tiny_dataset, "train")[0][0]
    base_mode = _mode(base_image)
    first = build_version(tiny_dataset, _samples(2, label), tmp_path / "v0001").root
    second = build_version(first, _samples(3, label), tmp_path / "v0002").root

    for version in (first, second):
        files = [p for p in version.rglob("*") if p.is_file()]
        assert {_mode(p) for p in files} == {0o444} and {_mode(d) for d in (version, version / "images")} == {0o555}
        listed = subprocess.run(["sha256sum", "--check", "--strict", "--quiet", CHECKSUMS], cwd=version, capture_output=True)
        assert listed.returncode == 0, listed.stdout + listed.stderr  # the standard tool reads the seal
        assert len((version / CHECKSUMS).read_text().splitlines()) == len(files) - 1  # every file but itself
    # the base dataset is its owner's: copied, never linked, its modes left alone
    assert base_image.stat().st_nlink == 1 and _mode(base_image) == base_mode
    linked = first / "images" / base_image.name
    assert (second / "images" / base_image.name).stat().st_ino == linked.stat().st_ino  # a sealed parent's: linked, cheap


def test_a_version_is_not_built_on_a_parent_changed_since_its_seal(tiny_dataset, tmp_path):
    """Else the change would be linked into the new version and sealed there as if it were data."""
    label = read_classes(tiny_dataset)[0]
    first = build_version(tiny_dataset, _samples(2, label), tmp_path / "v0001").root
    name = read_split(first, "train")[0][0]
    _tamper(first / "images" / name)
    with pytest.raises(TamperedVersionError, match=rf"v0001.*images/{name} changed"):
        build_version(first, _samples(3, label), tmp_path / "v0002")


def _publish_v0001(settings):
    """Feedback -> a staged, validated version (as the ingest DAG's first three tasks leave it)."""
    classes = read_classes(settings.base_dataset_dir)
    ids = [post_feedback(settings, photo_bytes(70 + i), classes[i]) for i in range(2)]
    staged = stage(settings)
    summary = validate(settings, dataset_dir=staged.staging_dir, out_dir=settings.work_dir / "validation")
    return ids, {**staged.handoff(), "digest": summary.digest}


def test_a_tampered_published_image_is_refused_at_training(live_settings, tmp_path):
    settings = live_settings
    ids, staged = _publish_v0001(settings)
    publish(settings, Path(staged["staging_dir"]), Path(staged["target_dir"]), ids, staged["num_samples"])
    version = current_dataset(settings)
    name = read_split(version, "train")[0][0]
    _tamper(version / "images" / name)

    with pytest.raises(TamperedVersionError, match=rf"dataset version {version}.*images/{name} changed"):
        train(settings, dataset_dir=version, out_dir=tmp_path / "train")
    assert not (tmp_path / "train").exists()  # refused before anything was trained
    with pytest.raises(DataValidationError, match=rf"images/{name} changed"):  # and the retrain's first task says so
        validate(settings, dataset_dir=version, out_dir=tmp_path / "validate")


# The first try of the ingest DAG's publish task, SIGKILLed (nothing cleaned up, no exception
# handler run) right after the database committed the export, or right after the version moved in.
KILLED_PUBLISH = """
import json, os, signal, sys
from pathlib import Path
from config import get_settings
from feedback import db
from feedback.export import publish

def then_killed(step):
    def wrapped(*args, **kwargs):
        step(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    return wrapped

if sys.argv[1] == "after the commit":
    db.mark_exported = then_killed(db.mark_exported)
else:
    Path.rename = then_killed(Path.rename)
staged = json.loads(sys.argv[2])
publish(get_settings(), Path(staged["staging_dir"]), Path(staged["target_dir"]), staged["feedback_ids"], staged["num_samples"])
"""


def _publish_task(settings):
    """The ingest DAG's publish task, as Airflow runs it: its function and its outlet events."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO_ROOT / "dags" / "ingest_feedback.py"))
    task = bag.dags["ingest_feedback"].get_task("publish_version")
    assert [outlet.name for outlet in task.outlets] == [TRAINING_DATASET.name]
    events = defaultdict(types.SimpleNamespace)
    return lambda staged: (task.python_callable(staged, outlet_events=events), events[TRAINING_DATASET].extra)


@pytest.mark.parametrize("killed", [None, "after the commit", "after the move"])
def test_a_publish_killed_after_the_commit_and_retried_has_one_export_row(live_settings, killed):
    """Airflow retries the task with the same staged version: the retry finishes what the killed
    try began, records nothing twice, and emits the event a publish that was never killed emits."""
    settings = live_settings
    ids, staged = _publish_v0001(settings)
    target = Path(staged["target_dir"])
    if killed:
        env = {**os.environ, "INSECT_FEEDBACK__DATABASE_URL": settings.feedback.database_url}
        first_try = subprocess.run([sys.executable, "-c", KILLED_PUBLISH, killed, json.dumps(staged)], cwd=REPO_ROOT, env=env)
        assert first_try.returncode == -9 and db.pending_count(db.engine(settings)) == 0  # committed, then killed
        assert target.exists() == (killed == "after the move")

    returned, extra = _publish_task(settings)(staged)

    exports = [export for export in db.exports(db.engine(settings)) if export.dataset_dir == str(target)]
    assert len(exports) == 1 and returned == str(target) and current_dataset(settings) == target
    with db.engine(settings).connect() as conn:
        consumed = conn.execute(sa.select(db.feedback.c.export_id).where(db.feedback.c.id.in_(ids))).scalars().all()
    assert consumed == [exports[0].id] * len(ids)
    assert extra == {"dataset_dir": str(target), "digest": staged["digest"], "feedback_ids": ids, "export_id": exports[0].id}
    validate(settings, dataset_dir=target, out_dir=settings.work_dir / "recheck")  # its seal still holds


def test_a_publish_into_a_version_another_publish_recorded_is_refused(live_settings):
    settings = live_settings
    ids, staged = _publish_v0001(settings)
    target = Path(staged["target_dir"])
    db.mark_exported(db.engine(settings), [], target, 0)  # another run's version of the same name
    with pytest.raises(FileExistsError, match="another"):
        publish(settings, Path(staged["staging_dir"]), target, ids, staged["num_samples"])
    assert db.pending_count(db.engine(settings)) == len(ids) and not target.exists()


@pytest.fixture
def database_at_0007(postgres_url):
    """A database of this test's own, migrated up to 0007 (before the exports' unique directory)."""
    name = f"exports_{os.urandom(6).hex()}"
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    url = sa.make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(db.MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url)
    command.upgrade(cfg, "0007")
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE {name} WITH (FORCE)"))
        admin.dispose()


def test_the_migration_merges_the_exports_a_retried_publish_recorded_twice(database_at_0007):
    engine = sa.create_engine(database_at_0007)
    with engine.begin() as conn:
        for dataset_dir in ("v0001", "v0001", "v0002"):  # v0001's publish retried after its commit
            conn.execute(sa.text("INSERT INTO dataset_exports (dataset_dir, num_samples) VALUES (:d, 1)"), {"d": dataset_dir})
        conn.execute(
            sa.text(
                "INSERT INTO feedback (image_sha256, image_key, predicted_label, corrected_label, export_id) "
                "VALUES ('a', 'k', 'p', 'c', 2), ('b', 'k', 'p', 'c', 3)"  # the retry marked v0001's rows again
            )
        )
    db.migrate(database_at_0007)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT id, dataset_dir FROM dataset_exports ORDER BY id")).all() == [
            (1, "v0001"),
            (3, "v0002"),
        ]
        assert conn.execute(sa.text("SELECT export_id FROM feedback ORDER BY id")).scalars().all() == [1, 3]
    engine.dispose()
