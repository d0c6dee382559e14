"""Airflow's and MLflow's environment for this project, defined once: `python -m config
airflow-env` (the Makefile's shell), `make up`'s services and the DAG tests all start from it.
docker-compose.yml cannot call Python: tests/code/test_infra.py keeps it in line with `make up`."""

from __future__ import annotations

from pathlib import Path

from config import REPO_ROOT, Settings


def airflow_environment(settings: Settings, airflow_home: Path | None = None) -> dict[str, str]:
    """Where Airflow keeps its state and finds the project's DAGs and plugins, and where MLflow
    tracks; `airflow_home` overrides the configured home (`make up` and the tests keep their own)."""
    return {
        "AIRFLOW_HOME": str(airflow_home or settings.resolved_airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
    }
