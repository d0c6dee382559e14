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

from airflow.sdk import dag, task

from config import get_settings
from dags.assets import TRAINING_DATASET
from dags.defaults import dag_arguments, fail_without_retry


@dag(**dag_arguments(get_settings(), schedule=get_settings().feedback.ingest_schedule, tags=["feedback"]), doc_md=__doc__)
def ingest_feedback():
    @task.short_circuit
    def enough_feedback() -> bool:
        from feedback import db
        from feedback.export import finish_interrupted_publish

        settings = get_settings()
        finish_interrupted_publish(settings)  # a version a killed run recorded but did not move into place
        pending = db.pending_count(
            db.engine(settings), settings.feedback.client_agreement
        )  # counted in SQL: the hourly check loads no rows
        print(f"{pending} feedback rows pending; a new version needs {settings.feedback.min_new_samples}")
        return pending >= settings.feedback.min_new_samples

    @task
    def stage_version() -> dict:
        from feedback.export import stage

        return stage(get_settings()).handoff()

    @task
    def validate_version(staged: dict) -> dict:
        """The training suite; a failing version is not published (no retry: data won't heal)."""
        from ml.validate import DataValidationError, validate

        settings = get_settings()
        report_dir = settings.work_dir / "validation" / Path(staged["target_dir"]).name
        with fail_without_retry(DataValidationError):
            summary = validate(settings, dataset_dir=Path(staged["staging_dir"]), out_dir=report_dir)
        return {**staged, "digest": summary.digest}

    @task(outlets=[TRAINING_DATASET])
    def publish_version(staged: dict, *, outlet_events=None) -> str:
        """A retry after a crash past the commit finishes the same version: one export, the same event."""
        from feedback.export import publish

        staging_dir, target_dir = Path(staged["staging_dir"]), Path(staged["target_dir"])
        export_id = publish(get_settings(), staging_dir, target_dir, staged["feedback_ids"], staged["num_samples"])
        extra = {"dataset_dir": staged["target_dir"], "digest": staged["digest"], "feedback_ids": staged["feedback_ids"]}
        outlet_events[TRAINING_DATASET].extra = {**extra, "export_id": export_id}
        return staged["target_dir"]

    staged = stage_version()
    enough_feedback() >> staged
    publish_version(validate_version(staged))


ingest_feedback()
