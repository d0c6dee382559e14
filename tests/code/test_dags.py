import ast
import logging
import os
import subprocess
import sys
from itertools import pairwise
from types import SimpleNamespace

from airflow.dag_processing.dagbag import DagBag

from config import REPO_ROOT, get_settings
from dags.assets import TRAINING_DATASET
from plugins.failure_report import FailureReport
from tests.support import PARSE_WITHOUT_CONNECTIONS

DAGS = REPO_ROOT / "dags"
MAX_TASK_LINES = 8


def _bag() -> DagBag:
    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    return bag


def test_parsing_the_dags_opens_no_database_or_network_connection():
    parsed = subprocess.run(
        [sys.executable, "-c", PARSE_WITHOUT_CONNECTIONS, str(DAGS)], capture_output=True, text=True, check=False, env=os.environ
    )
    assert parsed.returncode == 0, parsed.stdout[-3000:] + parsed.stderr[-3000:]
    assert "['drift_watch', 'ingest_feedback', 'retrain']" in parsed.stdout


def test_retrain_dag_runs_on_a_cron_and_on_new_dataset_versions():
    dag = _bag().dags.get("retrain")
    assert next(t.task_id for t in dag.topological_sort()) == "validate_data"
    assert {"validate_data", "train", "prune", "compile_model", "evaluate", "register"} == set(dag.task_ids)
    assert dag.timetable.timetable.expression == "0 3 * * 0"
    assert [asset.name for asset in dag.timetable.asset_condition.objects] == [TRAINING_DATASET.name]


def test_ingest_dag_publishes_the_dataset_asset_only_after_validation():
    dag = _bag().dags.get("ingest_feedback")
    order = [t.task_id for t in dag.topological_sort()]
    assert order == ["enough_feedback", "stage_version", "validate_version", "publish_version"]
    # a chain: without enough feedback, the short circuit skips staging and validation too
    assert all(dag.get_task(task).upstream_task_ids == {before} for before, task in pairwise(order))
    publish = dag.get_task("publish_version")
    assert [outlet.name for outlet in publish.outlets] == [TRAINING_DATASET.name]


def test_drift_watch_runs_on_its_configured_schedule(monkeypatch):
    monkeypatch.setenv("INSECT_DRIFT__SCHEDULE", "0 6 * * *")
    get_settings.cache_clear()
    try:
        dag = _bag().dags.get("drift_watch")
    finally:
        get_settings.cache_clear()
    assert dag.task_ids == ["check_drift"] and dag.timetable.expression == "0 6 * * *"


def test_every_task_retries_with_a_growing_delay():
    settings = get_settings()
    for dag in _bag().dags.values():
        for task in dag.tasks:
            assert task.retries == settings.retry.retries, task.task_id
            assert task.retry_exponential_backoff and task.retry_delay.total_seconds() == settings.retry.delay_s


def test_airflow_loads_the_failure_report_as_a_listener_plugin():
    loaded = (
        "from airflow.sdk.plugins_manager import _get_plugins; "
        "print([type(listener).__name__ for plugin in _get_plugins()[0] for listener in plugin.listeners])"
    )
    env = {**os.environ, "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins")}
    out = subprocess.run([sys.executable, "-c", loaded], env=env, capture_output=True, text=True, check=True)
    assert "FailureReport" in out.stdout, out.stdout + out.stderr


def test_failure_report_names_the_task_the_run_the_tries_and_the_error_of_the_last_try_only(caplog):
    def failed_try(number: int) -> None:
        ti = SimpleNamespace(
            dag_id="retrain", task_id="train", run_id="scheduled__x", try_number=number, task=SimpleNamespace(retries=2)
        )
        FailureReport().on_task_instance_failed(previous_state=None, task_instance=ti, error=RuntimeError("out of memory"))

    with caplog.at_level(logging.ERROR):
        failed_try(2)
        assert "TASK FAILED" not in caplog.text  # one more try to come
        failed_try(3)
    assert "TASK FAILED: retrain.train in run scheduled__x, try 3 of 3: RuntimeError('out of memory')" in caplog.text


def test_every_task_body_only_wires_a_stage():
    """A task is a few lines that call into ml/, feedback/ or registry/: the logic lives there."""
    for path in DAGS.glob("*.py"):
        for function in ast.walk(ast.parse(path.read_text())):
            if isinstance(function, ast.FunctionDef) and any("task" in ast.unparse(d) for d in function.decorator_list):
                body = [s for s in function.body if not isinstance(s, ast.Import | ast.ImportFrom)]
                if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                    body = body[1:]  # the docstring
                lines = body[-1].end_lineno - body[0].lineno + 1
                assert lines <= MAX_TASK_LINES, f"{path.name}: {function.name} has {lines} lines"
