"""The MLflow run a pipeline stage logs into, named explicitly.

Stages take a `RunLog` instead of logging into "the active run": a stage called outside the
pipeline (a test, the benchmark, its own CLI without --run-id) logs nothing rather than starting
a stray run, and a DAG task names the run every task of one DAG run shares.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from config import Settings


def configure(settings: Settings) -> None:
    """Point MLflow at the configured store and experiment. With the embedded SQLite default,
    artifacts go under the data directory (MLflow's default would be ./mlruns in the CWD)."""
    import mlflow

    mlflow.set_tracking_uri(settings.tracking_uri)
    if mlflow.get_experiment_by_name(settings.experiment_name) is None:
        local = settings.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in settings.tracking_uri
        location = settings.artifact_root.as_uri() if local else None
        mlflow.create_experiment(settings.experiment_name, artifact_location=location)
    mlflow.set_experiment(settings.experiment_name)


@dataclass(frozen=True)
class RunLog:
    """One MLflow run by id, on the configured tracking store; `run_id=None` logs nothing."""

    tracking_uri: str | None = None
    run_id: str | None = None

    @classmethod
    def of(cls, settings: Settings, run_id: str | None) -> RunLog:
        if run_id is None:
            return NO_RUN
        configure(settings)
        return cls(settings.tracking_uri, run_id)

    @classmethod
    def start(cls, settings: Settings, run_name: str) -> RunLog:
        """A new run in the configured experiment."""
        import mlflow

        configure(settings)
        experiment = mlflow.get_experiment_by_name(settings.experiment_name)
        run = mlflow.MlflowClient(settings.tracking_uri).create_run(experiment.experiment_id, run_name=run_name)
        return cls(settings.tracking_uri, run.info.run_id)

    @contextmanager
    def recording(self) -> Iterator[RunLog]:
        """The run while one stage logs into it: FINISHED after, FAILED when the stage raises
        (a later stage's task picks the same run up again)."""
        try:
            yield self
        except BaseException:
            self._end("FAILED")
            raise
        self._end("FINISHED")

    def _end(self, status: str) -> None:
        if self.run_id:
            self._client().set_terminated(self.run_id, status)

    def _client(self):
        import mlflow

        return mlflow.MlflowClient(self.tracking_uri)

    def params(self, values: dict) -> None:
        from mlflow.entities import Param

        if self.run_id:
            self._client().log_batch(self.run_id, params=[Param(key, str(value)) for key, value in values.items()])

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        if self.run_id:
            now = int(time.time() * 1000)
            batch = [Metric(key, float(value), now, step or 0) for key, value in values.items()]
            self._client().log_batch(self.run_id, metrics=batch)

    def tags(self, values: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if self.run_id:
            self._client().log_batch(self.run_id, tags=[RunTag(key, str(value)) for key, value in values.items()])

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.run_id:
            self._client().log_artifact(self.run_id, str(path), artifact_path)


NO_RUN = RunLog()
