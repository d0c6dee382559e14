"""MLflow tracking set-up shared by every pipeline step: one experiment, runs resumed by id."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import mlflow

from config import Settings


def configure(settings: Settings) -> None:
    """Point MLflow at the configured store and experiment. With the embedded SQLite default,
    artifacts go under the data directory (MLflow's default would be ./mlruns in the CWD)."""
    mlflow.set_tracking_uri(settings.tracking_uri)
    if mlflow.get_experiment_by_name(settings.experiment_name) is None:
        local = settings.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in settings.tracking_uri
        location = settings.artifact_root.as_uri() if local else None
        mlflow.create_experiment(settings.experiment_name, artifact_location=location)
    mlflow.set_experiment(settings.experiment_name)


@contextmanager
def run(settings: Settings, run_id: str | None = None, **start_kwargs) -> Iterator[mlflow.ActiveRun]:
    """Start a run, or resume `run_id`: each DAG task logs into the same run."""
    configure(settings)
    with mlflow.start_run(run_id=run_id, **start_kwargs) as active:
        yield active
