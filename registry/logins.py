"""Who may do what in an MLflow server behind its basic-auth app (`mlflow server --app-name
basic-auth`, with `default_permission = READ`): one login per service and a reviewer, created by
the admin through MLflow's own user API. Every login reads; what a login creates (airflow's
experiment, runs, registered model and versions) is its own; the reviewer may also move the
model's aliases (EDIT on the registered model, which MLflow also lets add versions)."""

from __future__ import annotations

import httpx

ADMIN = "admin"
SERVICES = ("airflow", "bento")
PROMOTERS = ("reviewer",)
USERS = (*SERVICES, *PROMOTERS)


class LoginsError(RuntimeError):
    """The MLflow server refused to create a login or grant a permission."""


def create_logins(tracking_uri: str, admin_password: str, passwords: dict[str, str], model_name: str) -> None:
    """Each of `USERS` with its password, and the promoters' right to `model_name`'s aliases;
    harmless again (an existing user keeps its password)."""
    with httpx.Client(base_url=f"{tracking_uri.rstrip('/')}/api", auth=(ADMIN, admin_password), timeout=30) as mlflow:
        for user in USERS:
            created = mlflow.post("/2.0/mlflow/users/create", json={"username": user, "password": passwords[user]})
            _done_or_done_before(created, f"create the login {user!r}")
        for user in PROMOTERS:
            grant = {"username": user, "resource_type": "registered_model", "resource_id": model_name, "permission": "EDIT"}
            _done_or_done_before(mlflow.post("/3.0/mlflow/users/permissions/grant", json=grant), f"let {user!r} promote")


def _done_or_done_before(answer: httpx.Response, what: str) -> None:
    if answer.status_code != 200 and "RESOURCE_ALREADY_EXISTS" not in answer.text:
        raise LoginsError(f"MLflow did not {what}: HTTP {answer.status_code} {answer.text[:300]}")
