"""The stack's secrets: generated on first start into a file only its owner can read, never committed."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from config.private import write_private

NAMES = (
    "airflow_db_password",
    "mlflow_db_password",
    "feedback_db_password",  # one PostgreSQL role each; the feedback database's owner migrates it
    "feedback_service_db_password",  # the Bento's role there: rows, no DDL, API keys read-only
    "feedback_keys_db_password",  # the key administrator's role there: API keys only
    "airflow_admin_password",
    "airflow_jwt_secret",
    "airflow_api_secret_key",
    # one S3 user per service, named insect-<service>: make up's S3 servers (stack/s3.py), compose's
    # and Kubernetes' MinIO users (infra/minio/insect-*.json)
    "s3_mlflow_secret_key",
    "s3_bento_secret_key",
    "s3_airflow_secret_key",
    "postgres_password",  # the superuser's, where a container image asks for one (compose)
    "redis_password",  # Celery's broker and the Bento's rate-limit counts
    "minio_root_password",  # compose's MinIO root; the services use the S3 keys of a user it limits to their buckets
    # MLflow's basic-auth logins: its admin, one per service, and a person who may promote
    "mlflow_admin_password",
    "mlflow_airflow_password",
    "mlflow_bento_password",
    "mlflow_reviewer_password",
    "mlflow_flask_secret_key",  # signs the MLflow UI's CSRF tokens
)
# The variable each secret goes by in a deployment's .env.
ENV_NAMES = {name: name.upper() for name in NAMES}
# Each S3 user's access key id (a name, not a secret: compose's MinIO users are named alike) and
# the secret holding its secret key.
S3_USERS = {user: (f"insect-{user}", f"s3_{user}_secret_key") for user in ("mlflow", "bento", "airflow")}


# A Kubernetes workload's Secret holds only what it uses (`python -m stack env-file --workload W`).
WORKLOADS = {
    "mlflow": ("mlflow_db_password", "mlflow_admin_password", "mlflow_flask_secret_key", "s3_mlflow_secret_key"),
    "mlflow-logins": ("mlflow_admin_password", "mlflow_airflow_password", "mlflow_bento_password", "mlflow_reviewer_password"),
    "feedback-migrate": ("feedback_db_password",),
    "bento": ("feedback_service_db_password", "mlflow_bento_password", "redis_password", "s3_bento_secret_key"),
    "airflow-tasks": ("feedback_db_password", "mlflow_airflow_password", "s3_airflow_secret_key"),
    "airflow-admin": ("airflow_admin_password",),
    "redis": ("redis_password",),
}


def load_or_create(path: Path) -> dict[str, str]:
    """The secrets in `path`, creating the file (mode 0600) with fresh random values the first
    time; a file written by an older version gains the names it lacks."""
    known = json.loads(path.read_text()) if path.exists() else {}
    missing = {name: secrets.token_urlsafe(24) for name in NAMES if name not in known}
    if missing:
        write_private(path, json.dumps(known | missing, indent=2))
    return known | missing


def write_env_file(secrets_: dict[str, str], path: Path, names: tuple[str, ...] = NAMES) -> None:
    """The secrets `names` (all by default) as a .env file (mode 0600) for `docker compose` and
    `kubectl create secret generic --from-env-file`."""
    write_private(path, "".join(f"{ENV_NAMES[name]}={secrets_[name]}\n" for name in names))
