from pathlib import Path

from airflow.dag_processing.dagbag import DagBag

DAGS = Path(__file__).resolve().parent.parent / "dags"


def test_dags_load_without_import_errors():
    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    dag = bag.dags.get("retrain")
    assert dag is not None
    assert next(t.task_id for t in dag.topological_sort()) == "validate_data"
    assert {"validate_data", "train", "prune", "compile_model", "evaluate", "register"} == set(dag.task_ids)
