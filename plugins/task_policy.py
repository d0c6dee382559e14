"""What every task of the project's DAGs shares: retries with a growing delay, and a failure
report in the task's log once the last try has failed."""

from __future__ import annotations

import logging
from datetime import timedelta

from config import Settings

log = logging.getLogger(__name__)


def default_args(settings: Settings) -> dict:
    retry = settings.retry
    return {
        "retries": retry.retries,
        "retry_delay": timedelta(seconds=retry.delay_s),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(seconds=retry.max_delay_s),
        "on_failure_callback": report_failure,
    }


def report_failure(context) -> None:
    """Which task of which run failed, after how many tries, and why: one line to grep for."""
    ti = context["ti"]
    log.error(
        "TASK FAILED: %s.%s in run %s, try %s of %s: %r",
        ti.dag_id,
        ti.task_id,
        ti.run_id,
        ti.try_number,
        context["task"].retries + 1,
        context.get("exception"),
    )
