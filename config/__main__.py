"""`python -m config airflow-env`: shell exports that point Airflow and MLflow at the configured
data directory, so the Makefile and a user's shell agree with the Python code."""

from __future__ import annotations

import shlex

import typer

from config import REPO_ROOT, get_settings

app = typer.Typer(add_completion=False)


@app.command()
def airflow_env() -> None:
    settings = get_settings()
    env = {
        "AIRFLOW_HOME": settings.resolved_airflow_home,
        "AIRFLOW__CORE__DAGS_FOLDER": REPO_ROOT / "dags",
        "AIRFLOW__CORE__PLUGINS_FOLDER": REPO_ROOT / "plugins",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
    }
    for key, value in env.items():
        print(f"export {key}={shlex.quote(str(value))}")


@app.command()
def show() -> None:
    """The effective settings, as JSON."""
    print(get_settings().model_dump_json(indent=2))


if __name__ == "__main__":
    app()
