"""`python -m config airflow-env`: shell exports that point Airflow and MLflow at the configured
data directory, so the Makefile and a user's shell agree with the Python code. `show`: the
effective settings. `airflow-admin`: a deployment's Airflow admin login (FAB auth manager)."""

from __future__ import annotations

import json
import os
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
    """The effective settings, as JSON; the passwords in the database and Redis URLs shown as ***."""
    settings = get_settings().model_dump(mode="json")
    for section, field in (("feedback", "database_url"), ("serve", "rate_limit_store")):
        if url := settings[section][field]:
            settings[section][field] = make_url(url).render_as_string(hide_password=True)
    print(json.dumps(settings, indent=2))


@app.command("airflow-admin")
def airflow_admin() -> None:
    """Create Airflow's `admin` login (FAB auth manager, Admin role), or give it the password
    again, from AIRFLOW_ADMIN_PASSWORD: through FAB's own user store, never a command line.
    Compose's airflow-init and Kubernetes' insect-airflow-admin job run it after the migration."""
    password = os.environ.get("AIRFLOW_ADMIN_PASSWORD")
    if not password:
        raise typer.BadParameter("set AIRFLOW_ADMIN_PASSWORD")
    from airflow.providers.fab.auth_manager.cli_commands.utils import get_application_builder

    with get_application_builder() as builder:
        security = builder.sm
        admin = security.find_user(username="admin")
        if admin is None:
            security.add_user("admin", "Airflow", "Admin", "admin@localhost", security.find_role("Admin"), password)
        else:
            security.reset_password(admin.id, password)
    typer.echo("Airflow login admin: " + ("created" if admin is None else "password set"))


if __name__ == "__main__":
    app()
