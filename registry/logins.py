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


def auth_config(database_uri: str) -> str:
    """The basic-auth app's settings file (MLFLOW_AUTH_CONFIG_PATH), its users kept in `database_uri`."""
    settings = {
        "default_permission": "READ",
        "database_uri": database_uri,
        "admin_username": ADMIN,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        "auth_cache_ttl_seconds": 60,  # a login's password hash is checked once a minute, not per request
    }
    return "[mlflow]\n" + "".join(f"{name} = {value}\n" for name, value in settings.items())


class LoginsError(RuntimeError):
    """The MLflow server refused to create a login or grant a permission."""


def create_logins(tracking_uri: str, admin_password: str, passwords: dict[str, str], experiment: str, model_name: str) -> None:
    """Each of `USERS` with its password; the experiment and `model_name` created by airflow (their
    owner) before any service starts: the first login to create either would own it, and a
    read-only one that did (the Bento, a reviewer's `registry list`) left Airflow's runs
    PERMISSION_DENIED; the Bento can also ask for a champion before the first version (basic-auth
    answers 403, not 404, for a model that does not exist); the promoters' right to its aliases.
    Harmless again; an existing user is given its password again (how a new one takes effect)."""
    with httpx.Client(base_url=f"{tracking_uri.rstrip('/')}/api", auth=(ADMIN, admin_password), timeout=30) as mlflow:
        for user in USERS:
            login = {"username": user, "password": passwords[user]}
            created = mlflow.post("/2.0/mlflow/users/create", json=login)
            if "RESOURCE_ALREADY_EXISTS" in created.text:
                created = mlflow.patch("/2.0/mlflow/users/update-password", json=login)
            _done_or_done_before(created, f"create the login {user!r} or set its password")
        as_airflow = ("airflow", passwords["airflow"])
        _done_or_done_before(
            mlflow.post("/2.0/mlflow/experiments/create", json={"name": experiment}, auth=as_airflow),
            f"create the experiment {experiment!r}",
        )
        _done_or_done_before(
            mlflow.post("/2.0/mlflow/registered-models/create", json={"name": model_name}, auth=as_airflow),
            f"register {model_name!r}",
        )
        for user in PROMOTERS:
            grant = {"username": user, "resource_type": "registered_model", "resource_id": model_name, "permission": "EDIT"}
            _done_or_done_before(mlflow.post("/3.0/mlflow/users/permissions/grant", json=grant), f"let {user!r} promote")


def _done_or_done_before(answer: httpx.Response, what: str) -> None:
    if answer.status_code != 200 and "RESOURCE_ALREADY_EXISTS" not in answer.text:
        raise LoginsError(f"MLflow did not {what}: HTTP {answer.status_code} {answer.text[:300]}")
