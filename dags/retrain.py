"""
### Retrain the insect classifier

Validate the dataset (Great Expectations) → train CoCa and the species classifier (DeepSpeed;
a retrain fine-tunes the champion's weights, feedback images drawn more often) → prune
(torch-pruning) → compile (TVM, llvm + cuda) → evaluate against the champion on the lab and field
slices → register in MLflow (`challenger`; `champion` if the gate finds it better
beyond noise).

Runs weekly, and whenever the ingest_feedback DAG publishes a new dataset version (the
`insect_training_dataset` Asset); it always trains on the newest version. Every task logs into
one MLflow run; tasks pass paths and ids (each stage's result record), never tensors. Each task
is one stage of `ml/` or `registry/`, which also runs alone: `python -m ml.<stage> --help`.
"""

from __future__ import annotations

from pathlib import Path

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

from config import get_settings
from dags.assets import TRAINING_DATASET
from dags.defaults import dag_arguments, fail_without_retry
from dags.stages import run_stage

WEEKLY_OR_NEW_DATASET = AssetOrTimeSchedule(
    timetable=CronTriggerTimetable("0 3 * * 0", timezone="UTC"), assets=[TRAINING_DATASET]
)


# A run may name its dataset (`airflow dags test retrain -c '{"dataset_dir": "..."}'`); the newest otherwise.
DATASET_PARAM = Param(None, type=["null", "string"], description="a dataset directory; empty: the newest version")


@dag(
    **dag_arguments(get_settings(), schedule=WEEKLY_OR_NEW_DATASET, tags=["training"]),
    params={"dataset_dir": DATASET_PARAM},
    doc_md=__doc__,
)
def retrain():
    @task
    def validate_data(params: dict | None = None) -> dict:
        """Check the dataset training will use (no retry: data won't heal); opens the MLflow run
        every task of this DAG run logs into. Returns the lineage: that run and the dataset."""
        from ml.data.versions import current_dataset
        from ml.tracking import RunLog
        from ml.validate import DataValidationError, validate

        settings = get_settings()
        dataset_dir = Path(params["dataset_dir"]) if params and params["dataset_dir"] else current_dataset(settings)
        with RunLog.start(settings, run_name="retrain").recording() as run, fail_without_retry(DataValidationError):
            out_dir = settings.stage_dir(run.run_id, "validate")
            summary = validate(settings, dataset_dir=dataset_dir, out_dir=out_dir, run=run)
        return {"run_id": run.run_id, "dataset": summary.model_dump(mode="json")}

    @task
    def train(lineage: dict) -> dict:
        """From the champion's weights when `train.warm_start` (and it knows the same species)."""
        from ml.train import train
        from registry import champion_weights

        settings = get_settings()
        warm_dir = settings.stage_dir(lineage["run_id"], "warm_start")
        warm_start = champion_weights(settings, warm_dir) if settings.train.warm_start else None
        return run_stage(train, "train", lineage, warm_start=warm_start)

    @task
    def prune(lineage: dict, trained: dict) -> dict:
        from ml.prune import prune

        return run_stage(prune, "prune", lineage, model_path=Path(trained["model_path"]))

    @task
    def compile_model(lineage: dict, pruned: dict) -> dict:
        from ml.compile import compile_model

        return run_stage(compile_model, "compile", lineage, model_path=Path(pruned["model_path"]))

    @task
    def evaluate(lineage: dict, pruned: dict) -> dict:
        """The candidate and the current champion, on the same images of every slice."""
        from ml.evaluate import evaluate
        from registry import champion_predict_fn

        champion = champion_predict_fn(get_settings())
        return run_stage(evaluate, "evaluate", lineage, model_path=Path(pruned["model_path"]), baseline=champion)

    @task
    def register(lineage: dict, compiled: dict, evaluation: dict) -> dict:
        from ml.results import CompileResult, Evaluation, ValidationSummary
        from ml.tracking import RunLog
        from registry import register

        settings = get_settings()
        compiled, evaluation = CompileResult(**compiled), Evaluation(**evaluation)
        dataset = ValidationSummary(**lineage["dataset"])
        with RunLog.of(settings, lineage["run_id"]).recording() as run:
            registration = register(settings, compiled=compiled, evaluation=evaluation, dataset=dataset, run=run)
        return registration.model_dump()

    lineage = validate_data()
    pruned = prune(lineage, train(lineage))
    register(lineage, compile_model(lineage, pruned), evaluate(lineage, pruned))


retrain()
