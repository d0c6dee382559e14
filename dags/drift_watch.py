"""
### Drift watch

Daily (`drift.schedule`): are users' photos still like the ones the champion was trained for?
The champion's softmax outputs on the newest `drift.window` predictions are compared with its
outputs on lab images it never trained on, by an MMD test with a permutation p-value
(`ml/drift.py`). MMD² and the p-value are logged to MLflow (runs named `drift-watch`); the log
says DRIFT when p < `drift.alpha`; every prediction's score is stored so labelers see the least
familiar images first.
"""

from __future__ import annotations

from dataclasses import asdict

from airflow.sdk import dag, task

from config import get_settings
from dags.defaults import dag_arguments


@dag(**dag_arguments(get_settings(), schedule=get_settings().drift.schedule, tags=["monitoring"]), doc_md=__doc__)
def drift_watch():
    @task
    def check_drift() -> dict | None:
        from feedback.drift import RUN_NAME, watch
        from ml.tracking import RunLog

        settings = get_settings()
        with RunLog.start(settings, run_name=RUN_NAME).recording() as run:
            report = watch(settings, run)
        return None if report is None else asdict(report)

    check_drift()


drift_watch()
