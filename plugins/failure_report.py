"""An Airflow plugin: a one-line failure report in the task's log once a task's last try has
failed, for every task of every DAG (a listener, so no DAG has to remember a callback)."""

from __future__ import annotations

import logging

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin

log = logging.getLogger(__name__)


class FailureReport:
    @hookimpl
    def on_task_instance_failed(self, previous_state, task_instance, error) -> None:
        """Called on every failed try; reports the last one: which task of which run, after how many tries, and why."""
        tries = task_instance.task.retries + 1
        if task_instance.try_number < tries:  # Airflow will try again
            return
        log.error(
            "TASK FAILED: %s.%s in run %s, try %s of %s: %r",
            task_instance.dag_id,
            task_instance.task_id,
            task_instance.run_id,
            task_instance.try_number,
            tries,
            error,
        )


class FailureReportPlugin(AirflowPlugin):
    name = "insect_failure_report"
    listeners = [FailureReport()]  # noqa: RUF012 (Airflow's declared class attribute)
