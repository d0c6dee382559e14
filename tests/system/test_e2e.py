"""The DAGs end to end through `airflow dags test`, as `make demo` runs them."""

import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from benchmarks.fixtures import register_tiny_model
from config import REPO_ROOT
from config.airflow import airflow_environment
from dags.assets import TRAINING_DATASET
from feedback import __main__ as feedback_cli
from feedback import db
from feedback.images import image_key, image_store
from ml.data import read_classes, read_split
from ml.data.synthetic import user_photos
from registry import CHAMPION, verified_manifest
from tests.support import photo_bytes, post_feedback


def _airflow(args: list[str], env: dict) -> subprocess.CompletedProcess:
    airflow = Path(sys.executable).with_name("airflow")
    return subprocess.run(
        [str(airflow), *args], check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1500
    )


def _airflow_env(settings, tmp_path) -> dict:
    env = {**os.environ, **airflow_environment(settings, airflow_home=tmp_path / "airflow")}
    assert _airflow(["db", "migrate"], env).returncode == 0
    return env


@pytest.mark.slow
def test_ingest_publishes_the_good_rows_quarantines_the_bad_and_the_next_retrain_trains_on_it(live_settings, tmp_path):
    settings = live_settings
    classes = read_classes(settings.base_dataset_dir)
    ids = [post_feedback(settings, photo_bytes(10 + i), classes[i % len(classes)]) for i in range(3)]
    test_image, _ = read_split(settings.base_dataset_dir, "test")[0]
    bad = [
        post_feedback(settings, photo_bytes(20), "dragon"),  # an unknown species
        post_feedback(settings, (settings.base_dataset_dir / "images" / test_image).read_bytes(), classes[0]),  # a test image
    ]
    env = {
        **_airflow_env(settings, tmp_path),
        "INSECT_FEEDBACK__DATABASE_URL": settings.feedback.database_url,
        "INSECT_FEEDBACK__S3_BUCKET": settings.feedback.s3_bucket,
        "INSECT_FEEDBACK__S3_ENDPOINT_URL": settings.feedback.s3_endpoint_url,
        "INSECT_FEEDBACK__MIN_NEW_SAMPLES": "3",
    }
    result = _airflow(["dags", "test", "ingest_feedback"], env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    version = settings.dataset_versions_dir / "v0001"
    assert len(read_split(version, "train")) == len(read_split(settings.base_dataset_dir, "train")) + 3
    assert db.pending_feedback(db.engine(settings)) == []
    with sqlite3.connect(tmp_path / "airflow" / "airflow.db") as conn:
        events = conn.execute("SELECT a.name, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id").fetchall()
    assert [name for name, _ in events] == [TRAINING_DATASET.name]
    assert json.loads(events[0][1])["feedback_ids"] == ids
    assert [row.id for row in db.quarantined(db.engine(settings))] == bad

    retrained = _airflow(["dags", "test", "retrain"], env)  # unnamed: the newest version
    assert retrained.returncode == 0, retrained.stdout[-4000:] + retrained.stderr[-4000:]
    mlflow.set_tracking_uri(settings.tracking_uri)
    champion = MlflowClient().get_model_version_by_alias(settings.registered_model_name, CHAMPION)
    assert champion.tags["dataset_dir"] == str(version)


@pytest.mark.slow
def test_retrain_dag_registers_a_champion_trained_on_the_dataset_the_run_names(settings, tmp_path):
    shutil.copytree(settings.base_dataset_dir, settings.dataset_versions_dir / "v0001")  # newer than the base
    env = _airflow_env(settings, tmp_path)
    conf = json.dumps({"dataset_dir": str(settings.base_dataset_dir)})  # as make demo's first retrain names it
    result = _airflow(["dags", "test", "retrain", "-c", conf], env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    mlflow.set_tracking_uri(settings.tracking_uri)
    client = MlflowClient()
    champion = client.get_model_version_by_alias(settings.registered_model_name, CHAMPION)
    metrics = mlflow.get_run(champion.run_id).data.metrics
    assert {"lab_top1", "lab_top5", "lab_macro_f1", "lab_ece", "tvm_max_abs_diff"} <= set(metrics)
    registered = verified_manifest(settings, champion)["files"]  # every file of the model, libraries and pickle included
    assert {"MLmodel", "python_model.pkl"} <= registered.keys() and any(path.startswith("artifacts/") for path in registered)
    assert "dataset_digest" in champion.tags
    assert champion.tags["dataset_dir"] == str(settings.base_dataset_dir)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{settings.registered_model_name}/{champion.version}"))
    assert {"model.pt2", "model_llvm_b1.so"} <= {p.name for p in (local / "artifacts").iterdir()}
    assert mlflow.get_run(champion.run_id).data.params["train.started_from"] == "scratch"

    again = _airflow(["dags", "test", "retrain"], env)  # on v0001: the same species, so from the champion
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    [second] = [v for v in client.search_model_versions(f"name='{settings.registered_model_name}'") if str(v.version) == "2"]
    assert mlflow.get_run(second.run_id).data.params["train.started_from"] == "champion"


@pytest.mark.slow
def test_drift_watch_dag_tests_the_newest_predictions_logs_to_mlflow_and_ranks_them(live_settings, tmp_path):
    settings = live_settings
    classes = read_classes(settings.base_dataset_dir)
    register_tiny_model(classes, seed=0)
    store, engine = image_store(settings), db.engine(settings)
    predicted = []
    for image, _ in user_photos(len(classes), 24, 64, seed=5):
        out = io.BytesIO()
        image.save(out, format="JPEG")
        sha = hashlib.sha256(out.getvalue()).hexdigest()
        key = image_key(settings.feedback.s3_prefix, sha, ".jpg")
        store.put(key, out.getvalue(), "image/jpeg")
        columns = {"model_name": "m", "model_version": "1", "backend": "eager", "label": classes[0], "probability": 0.5}
        predicted.append(db.record_prediction(engine, **columns, image_sha256=sha, image_key=key))
    store.put("feedback/broken.jpg", b"not an image", "image/jpeg")  # neither of these stops the watch
    for key in ("feedback/broken.jpg", "feedback/never-stored.jpg"):
        db.record_prediction(engine, **columns, image_sha256="0" * 64, image_key=key)
    env = {
        **_airflow_env(settings, tmp_path),
        "INSECT_FEEDBACK__DATABASE_URL": settings.feedback.database_url,
        "INSECT_FEEDBACK__S3_BUCKET": settings.feedback.s3_bucket,
        "INSECT_FEEDBACK__S3_ENDPOINT_URL": settings.feedback.s3_endpoint_url,
        "INSECT_DRIFT__WINDOW": "26",
        "INSECT_DRIFT__MIN_PREDICTIONS": "10",
    }
    result = _airflow(["dags", "test", "drift_watch"], env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    assert "drift: users' photos" in (result.stdout + result.stderr).lower()
    mlflow.set_tracking_uri(settings.tracking_uri)
    [run] = mlflow.search_runs(
        experiment_names=[settings.experiment_name], filter_string="run_name = 'drift-watch'", output_format="list"
    )
    assert 0 < run.data.metrics["drift_p_value"] <= 1 and run.data.metrics["drift_mmd2"] >= 0
    shown = CliRunner().invoke(feedback_cli.app, ["drift", "--top", "3"])
    assert shown.exit_code == 0 and f"on the newest 24 predictions vs {2 * 4 * 2} lab images" in shown.output, shown.output
    assert shown.output.count("witness") == 3
    ranked = db.most_drifted(engine, 100)
    assert {row.id for row in ranked} == set(predicted)
    assert [row.witness for row in ranked] == sorted((row.witness for row in ranked), reverse=True)
