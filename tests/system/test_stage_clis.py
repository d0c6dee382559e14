"""Every stage of the retrain DAG runs alone from its own command line, each reading what the one
before wrote (its result.json), as a person would chain them from a shell."""

import json
import os
import subprocess
import sys

import mlflow
import pytest

from config import REPO_ROOT
from ml.results import Evaluation
from ml.tracking import RunLog
from registry import CHAMPION, version_by_alias


def _stage(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=os.environ, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{") :])


@pytest.mark.slow
def test_each_stage_runs_from_its_own_cli_and_the_chain_registers_a_champion(settings, tmp_path):
    run = RunLog.start(settings, run_name="from the shell")
    dataset = ["--dataset-dir", str(settings.base_dataset_dir)]
    validated = _stage("ml.validate", "--out-dir", str(tmp_path / "validate"), *dataset)
    trained = _stage("ml.train", "--out-dir", str(tmp_path / "train"), "--run-id", run.run_id, *dataset)
    pruned = _stage("ml.prune", "--model", trained["model_path"], "--out-dir", str(tmp_path / "prune"), *dataset)
    compiled = _stage("ml.compile", "--model", pruned["model_path"], "--out-dir", str(tmp_path / "compile"), *dataset)
    evaluated = _stage("ml.evaluate", "--model", pruned["model_path"], "--out-dir", str(tmp_path / "evaluate"), *dataset)
    registered = _stage("registry", "register", "--run-dir", str(tmp_path), "--run-id", run.run_id)

    assert validated["num_classes"] == 4 and validated["dataset_dir"] == str(settings.base_dataset_dir)
    assert pruned["flops_after"] < pruned["flops_before"]
    assert {"exported", "tvm_llvm_b1"} <= set(compiled["artifacts"])
    assert registered["champion"] and registered["metrics"] == Evaluation(**evaluated).metrics()
    mlflow.set_tracking_uri(settings.tracking_uri)
    assert str(version_by_alias(settings.registered_model_name, CHAMPION).version) == registered["version"]
    logged = mlflow.get_run(run.run_id).data
    assert "val_top1" in logged.metrics and logged.params["train.batch_size"] == "8"  # only the stages given --run-id log
    assert "prune_flops_after" not in logged.metrics
