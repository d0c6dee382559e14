import logging
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

from airflow.dag_processing.dagbag import DagBag

from config import TRAINING_DATASET_ASSET, get_settings
from plugins.task_policy import report_failure

DAGS = Path(__file__).resolve().parent.parent / "dags"


def _bag() -> DagBag:
    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    return bag


def test_retrain_dag_runs_on_a_cron_and_on_new_dataset_versions():
    dag = _bag().dags.get("retrain")
    assert next(t.task_id for t in dag.topological_sort()) == "validate_data"
    assert {"validate_data", "train", "prune", "compile_model", "evaluate", "register"} == set(dag.task_ids)
    assert dag.timetable.timetable.expression == "0 3 * * 0"
    assert [asset.name for asset in dag.timetable.asset_condition.objects] == [TRAINING_DATASET_ASSET]


def test_ingest_dag_publishes_the_dataset_asset_only_after_validation():
    dag = _bag().dags.get("ingest_feedback")
    order = [t.task_id for t in dag.topological_sort()]
    assert order == ["enough_feedback", "stage_version", "validate_version", "publish_version"]
    # a chain: without enough feedback, the short circuit skips staging and validation too
    assert all(dag.get_task(task).upstream_task_ids == {before} for before, task in pairwise(order))
    publish = dag.get_task("publish_version")
    assert [outlet.name for outlet in publish.outlets] == [TRAINING_DATASET_ASSET]


def test_every_task_retries_with_a_growing_delay_and_reports_its_failure():
    settings = get_settings()
    for dag in _bag().dags.values():
        for task in dag.tasks:
            assert task.retries == settings.retry.retries, task.task_id
            assert task.retry_exponential_backoff and task.retry_delay.total_seconds() == settings.retry.delay_s
            assert report_failure in task.on_failure_callback


def test_failure_report_names_the_task_the_run_the_tries_and_the_error(caplog):
    ti = SimpleNamespace(dag_id="retrain", task_id="train", run_id="scheduled__x", try_number=3)
    with caplog.at_level(logging.ERROR):
        report_failure({"ti": ti, "task": SimpleNamespace(retries=2), "exception": RuntimeError("out of memory")})
    assert "TASK FAILED: retrain.train in run scheduled__x, try 3 of 3: RuntimeError('out of memory')" in caplog.text
