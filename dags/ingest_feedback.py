"""
### Ingest user feedback into a new training-dataset version

Hourly (`feedback.ingest_schedule`): when at least `feedback.min_new_samples` corrections arrived since the last export,
build the next dataset version (the current one plus the corrected images, deduplicated by image
hash) from PostgreSQL rows and stored images, validate it with the same Great Expectations suite
as training, then publish it: the `insect_training_dataset` Asset event schedules `retrain`.

A version that fails validation is never published and its feedback stays pending.
"""

from __future__ import annotations

from pathlib import Path

import pendulum
from airflow.sdk import Asset, dag, task

from config import TRAINING_DATASET_ASSET, get_settings
from plugins.task_policy import default_args

training_dataset = Asset(TRAINING_DATASET_ASSET)


@dag(
    schedule=get_settings().feedback.ingest_schedule,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(get_settings()),
    tags=["insect", "feedback"],
    doc_md=__doc__,
)
def ingest_feedback():
    @task.short_circuit
    def enough_feedback() -> bool:
        from feedback.export import pending_count

        settings = get_settings()
        pending = pending_count(settings)
        print(f"{pending} feedback rows pending; a new version needs {settings.feedback.min_new_samples}")
        return pending >= settings.feedback.min_new_samples

    @task
    def stage_version() -> dict:
        from feedback.export import stage

        staged = stage(get_settings())
        summary = staged.summary
        print(
            f"staged {staged.target_dir.name} from {staged.parent_dir}: {summary.added} images added, "
            f"{summary.relabelled} relabelled, {len(summary.skipped)} skipped {summary.skipped}"
        )
        return {
            "staging_dir": str(staged.staging_dir),
            "target_dir": str(staged.target_dir),
            "feedback_ids": staged.feedback_ids,
            "num_samples": summary.added + summary.relabelled,
        }

    @task
    def validate_version(staged: dict) -> dict:
        """The training suite; a failing version is not published (no retry: data won't heal)."""
        from airflow.sdk.exceptions import AirflowFailException

        from ml.validate import DataValidationError, validate_dataset

        report_dir = get_settings().work_dir / "validation" / Path(staged["target_dir"]).name
        try:
            summary = validate_dataset(Path(staged["staging_dir"]), report_dir)
        except DataValidationError as error:
            raise AirflowFailException(str(error)) from error
        return {**staged, "digest": summary.digest}

    @task(outlets=[training_dataset])
    def publish_version(staged: dict, *, outlet_events=None) -> str:
        from feedback.export import publish

        export_id = publish(
            get_settings(), Path(staged["staging_dir"]), Path(staged["target_dir"]), staged["feedback_ids"], staged["num_samples"]
        )
        outlet_events[training_dataset].extra = {
            "dataset_dir": staged["target_dir"],
            "digest": staged["digest"],
            "export_id": export_id,
            "feedback_ids": staged["feedback_ids"],
        }
        return staged["target_dir"]

    staged = stage_version()
    enough_feedback() >> staged
    publish_version(validate_version(staged))


ingest_feedback()
