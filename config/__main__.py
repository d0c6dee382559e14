"""`python -m config airflow-env`: shell exports that point Airflow and MLflow at the configured
data directory, so the Makefile and a user's shell agree with the Python code."""

from __future__ import annotations

import shlex

import typer

from config import get_settings
from config.airflow import airflow_environment

app = typer.Typer(add_completion=False)


@app.command()
def airflow_env() -> None:
    for key, value in airflow_environment(get_settings()).items():
        print(f"export {key}={shlex.quote(value)}")


@app.command()
def show() -> None:
    """The effective settings, as JSON."""
    print(get_settings().model_dump_json(indent=2))


if __name__ == "__main__":
    app()
