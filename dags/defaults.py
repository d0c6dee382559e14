"""What every DAG of the project and every task in it share: one start date, no catch-up, one
run at a time, retries with a growing delay (Airflow's default_args), and no retry for failures
that waiting cannot heal."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import pendulum

from config import Settings


def dag_arguments(settings: Settings, *, schedule, tags: list[str]) -> dict:
    """`@dag(...)`'s arguments but the documentation, which is each DAG file's own."""
    return {
        "schedule": schedule,
        "start_date": pendulum.datetime(2026, 1, 1, tz="UTC"),
        "catchup": False,
        "max_active_runs": 1,
        "default_args": default_args(settings),
        "tags": ["insect", *tags],
    }


def default_args(settings: Settings) -> dict:
    retry = settings.retry
    return {
        "retries": retry.retries,
        "retry_delay": timedelta(seconds=retry.delay_s),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(seconds=retry.max_delay_s),
    }


@contextmanager
def fail_without_retry(*errors: type[Exception]) -> Iterator[None]:
    """Turn `errors` into Airflow's no-retry failure: a dataset that breaks an expectation fails
    the same way on every try."""
    from airflow.sdk.exceptions import AirflowFailException

    try:
        yield
    except errors as error:
        raise AirflowFailException(str(error)) from error
