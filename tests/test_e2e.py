"""The retraining DAG end to end through `airflow dags test`, as `make demo` runs it."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from registry import CHAMPION

REPO = Path(__file__).resolve().parent.parent


def _airflow(args: list[str], env: dict) -> subprocess.CompletedProcess:
    airflow = Path(sys.executable).with_name("airflow")
    return subprocess.run([str(airflow), *args], check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)


@pytest.mark.slow
def test_retrain_dag_registers_a_champion(settings, tmp_path):
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
           "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"), "MLFLOW_TRACKING_URI": settings.tracking_uri}
    assert _airflow(["db", "migrate"], env).returncode == 0
    result = _airflow(["dags", "test", "retrain"], env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    mlflow.set_tracking_uri(settings.tracking_uri)
    client = MlflowClient()
    champion = client.get_model_version_by_alias(settings.registered_model_name, CHAMPION)
    metrics = mlflow.get_run(champion.run_id).data.metrics
    assert {"top1", "top5", "macro_f1", "tvm_max_abs_diff"} <= set(metrics)
    assert {"sha256.exported", "sha256.tvm_llvm", "dataset_digest"} <= set(champion.tags)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{settings.registered_model_name}/{champion.version}"))
    assert {"model.pt2", "model_llvm.so"} <= {p.name for p in (local / "artifacts").iterdir()}
