"""
### Retrain the insect classifier

Validate the dataset (Great Expectations) → train CoCa and the species classifier (DeepSpeed)
→ prune (torch-pruning) → compile (TVM, llvm + cuda) → evaluate against the champion on the
test split → register in MLflow (`challenger`; `champion` if it wins).

Runs weekly, and whenever the ingest_feedback DAG publishes a new dataset version (the
`insect_training_dataset` Asset); it always trains on the newest version. Every task logs into
one MLflow run; tasks pass paths and ids, never tensors.
"""

from __future__ import annotations

from pathlib import Path

import pendulum
from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, dag, task

from config import TRAINING_DATASET_ASSET, get_settings
from plugins.task_policy import default_args


@dag(
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("0 3 * * 0", timezone="UTC"), assets=[Asset(TRAINING_DATASET_ASSET)]
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(get_settings()),
    tags=["insect", "training"],
    doc_md=__doc__,
)
def retrain():
    @task
    def validate_data() -> dict:
        """Stop before training when the dataset breaks an expectation (no retry: data won't heal)."""
        from airflow.sdk.exceptions import AirflowFailException

        from ml.data.versions import current_dataset
        from ml.validate import DataValidationError, validate_dataset
        from registry.tracking import run

        settings = get_settings()
        dataset = current_dataset(settings)
        try:
            summary = validate_dataset(dataset, settings.work_dir / "validation")
        except DataValidationError as error:
            raise AirflowFailException(str(error)) from error
        with run(settings, run_name="retrain") as active:
            import mlflow

            mlflow.set_tags({"dataset_digest": summary.digest, "dataset_dir": str(dataset)})
            mlflow.log_params({"dataset.images": summary.num_images, "dataset.classes": summary.num_classes})
            mlflow.log_artifact(str(summary.report_path), "validation")
            return {"run_id": active.info.run_id, "dataset_dir": str(dataset), "digest": summary.digest}

    @task
    def train(ctx: dict) -> str:
        from ml.train import train as train_model
        from registry.tracking import run

        settings = get_settings()
        with run(settings, ctx["run_id"]):
            result = train_model(settings, Path(ctx["dataset_dir"]), settings.work_dir / ctx["run_id"] / "train")
        return str(result.model_path)

    @task
    def prune(ctx: dict, model_path: str) -> str:
        from ml.prune import prune as prune_model
        from registry.tracking import run

        settings = get_settings()
        with run(settings, ctx["run_id"]):
            result = prune_model(
                Path(model_path), Path(ctx["dataset_dir"]), settings, settings.work_dir / ctx["run_id"] / "prune"
            )
        return str(result.model_path)

    @task
    def compile_model(ctx: dict, model_path: str) -> dict:
        from ml.compile import compile_model as build
        from registry.tracking import run

        settings = get_settings()
        with run(settings, ctx["run_id"]):
            result = build(
                Path(model_path),
                Path(ctx["dataset_dir"]),
                settings.compile,
                settings.work_dir / ctx["run_id"] / "compile",
                settings.tuning_dir,
            )
        artifacts = {
            "exported": str(result.exported_path),
            **{f"tvm_llvm_b{batch}": str(path) for batch, path in result.llvm_paths.items()},
            **{f"tvm_cuda_{arch}": str(path) for arch, path in result.cuda_paths.items()},
        }
        return {"artifacts": artifacts, "tvm_llvm_target": result.llvm_target}

    @task
    def evaluate(ctx: dict, model_path: str) -> dict:
        """The candidate and the current champion, on the same test split."""
        import mlflow

        from ml.evaluate import evaluate as score
        from ml.evaluate import torch_predict_fn
        from ml.prune import load_model
        from registry import CHAMPION, version_by_alias
        from registry import load_model as load_registered
        from registry.tracking import run

        settings = get_settings()
        dataset, out = Path(ctx["dataset_dir"]), settings.work_dir / ctx["run_id"] / "evaluate"
        model = load_model(Path(model_path))
        with run(settings, ctx["run_id"]):
            candidate = score(torch_predict_fn(model), dataset, model.classes, model.image_size, out)
            mlflow.log_metrics(candidate)
            mlflow.log_artifact(str(out / "confusion_matrix.png"), "evaluation")
            champion = None
            if version_by_alias(settings.registered_model_name, CHAMPION) is not None:
                served = load_registered(settings.registered_model_name)
                champion = score(served.predict, dataset, model.classes, model.image_size)
                mlflow.log_metrics({f"champion_{k}": v for k, v in champion.items()})
        return {"candidate": candidate, "champion": champion, "classes": model.classes, "image_size": model.image_size}

    @task
    def register(ctx: dict, compiled: dict, evaluation: dict) -> dict:
        import json

        from registry import gate, register_model
        from registry.tracking import run

        settings = get_settings()
        name = settings.registered_model_name
        with run(settings, ctx["run_id"]):
            version = register_model(
                name,
                {k: Path(v) for k, v in compiled["artifacts"].items()},
                {
                    "classes": evaluation["classes"],
                    "image_size": evaluation["image_size"],
                    "tvm_llvm_target": compiled["tvm_llvm_target"],
                },
                tags={
                    "dataset_digest": ctx["digest"],
                    "dataset_dir": ctx["dataset_dir"],
                    "run_id": ctx["run_id"],
                    "config": json.dumps(settings.model_dump(include={"model", "train", "prune", "compile"}), default=str),
                },
            )
            promoted = gate(name, version.version, evaluation["candidate"], evaluation["champion"])
        return {"name": name, "version": version.version, "champion": promoted, **evaluation["candidate"]}

    ctx = validate_data()
    pruned = prune(ctx, train(ctx))
    register(ctx, compile_model(ctx, pruned), evaluate(ctx, pruned))


retrain()
