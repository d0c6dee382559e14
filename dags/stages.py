"""How a retrain task runs one pipeline stage: on the dataset validation chose, in the DAG run's
MLflow run, writing under that run's work directory, handing its result record on through XCom."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from config import get_settings
from ml.results import StageResult
from ml.tracking import RunLog


def run_stage(stage: Callable[..., StageResult], name: str, lineage: dict, **inputs) -> dict:
    """`stage(settings, dataset_dir=..., out_dir=<work dir>/<run id>/<name>, run=..., **inputs)`,
    its result as JSON. `lineage` is what `validate_data` returned: the run and the dataset."""
    settings = get_settings()
    run_id, dataset_dir = lineage["run_id"], Path(lineage["dataset"]["dataset_dir"])
    with RunLog.of(settings, run_id).recording() as run:
        result = stage(settings, dataset_dir=dataset_dir, out_dir=settings.stage_dir(run_id, name), run=run, **inputs)
    return result.model_dump(mode="json")
