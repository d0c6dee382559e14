"""`python -m config airflow-env`: shell exports that point Airflow and MLflow at the configured
data directory, so the Makefile and a user's shell agree with the Python code."""

from __future__ import annotations

import json
import shlex

import typer
from sqlalchemy import make_url

from config import get_settings
from config.airflow import airflow_environment

app = typer.Typer(add_completion=False)


@app.command()
def airflow_env() -> None:
    for key, value in airflow_environment(get_settings()).items():
        print(f"export {key}={shlex.quote(value)}")


@app.command()
def show() -> None:
    """The effective settings, as JSON; a database URL's password shown as ***."""
    settings = get_settings().model_dump(mode="json")
    if url := settings["feedback"]["database_url"]:
        settings["feedback"]["database_url"] = make_url(url).render_as_string(hide_password=True)
    print(json.dumps(settings, indent=2))


if __name__ == "__main__":
    app()
