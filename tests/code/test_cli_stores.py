"""The command lines say which store they read, start no database on their own, and answer a
wrong argument in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from config import REPO_ROOT


def run(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m <args>` on a fresh data directory, with only the stores `env` names."""
    stores = ("MLFLOW_TRACKING_URI", "INSECT_FEEDBACK__DATABASE_URL")
    environment = {key: value for key, value in os.environ.items() if key not in stores}
    environment.update(INSECT_DATA_DIR=str(tmp_path / "data"), **env)
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO_ROOT, env=environment, capture_output=True, text=True, check=False
    )


def test_a_feedback_command_says_no_database_is_running_instead_of_starting_one(tmp_path):
    done = run(tmp_path, "feedback", "exports")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "no feedback database" in done.stderr and "python -m stack env" in done.stderr
    assert not (tmp_path / "data" / "postgres").exists()


def test_a_feedback_command_names_the_database_it_reads_without_its_password(tmp_path, postgres_url):
    done = run(tmp_path, "feedback", "exports", INSECT_FEEDBACK__DATABASE_URL=postgres_url)
    assert done.returncode == 0, done.stderr
    assert f"feedback database: {postgres_url.split('://')[0]}" in done.stderr


def test_promoting_a_version_that_does_not_exist_is_one_line_naming_the_registry(tmp_path):
    done = run(tmp_path, "registry", "promote", "7")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"registry: sqlite:///{tmp_path / 'data' / 'mlflow.db'}" in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "Registered Model with name=insect-classifier not found"


def test_config_show_hides_the_database_and_redis_passwords(tmp_path):
    url = "postgresql+psycopg2://insect:s3cret-pw@127.0.0.1:5434/insect"
    store = "redis://:r3dis-pw@127.0.0.1:6380/1"
    done = run(tmp_path, "config", "show", INSECT_FEEDBACK__DATABASE_URL=url, INSECT_SERVE__RATE_LIMIT_STORE=store)
    assert done.returncode == 0 and "s3cret-pw" not in done.stdout and "r3dis-pw" not in done.stdout
    shown = json.loads(done.stdout)
    assert shown["feedback"]["database_url"] == "postgresql+psycopg2://insect:***@127.0.0.1:5434/insect"
    assert shown["serve"]["rate_limit_store"] == "redis://:***@127.0.0.1:6380/1"


def test_stack_env_points_a_shell_at_the_stack_with_what_a_person_promoting_models_needs(tmp_path):
    """The services' URLs, the API keys' folder, the reviewer's MLflow login and the feedback
    database as its key administrator (README's `python -m feedback exports` and `keys list`), not
    its owner: no S3 key, no other secret."""
    done = run(tmp_path, "stack", "env", INSECT_STACK__MLFLOW_PORT="5055")
    assert done.returncode == 0, done.stderr
    exports = dict(line.removeprefix("export ").split("=", 1) for line in done.stdout.splitlines() if line.startswith("export"))
    assert exports["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5055" and exports["MLFLOW_TRACKING_USERNAME"] == "reviewer"
    assert exports["INSECT_FEEDBACK__DATABASE_URL"].startswith("postgresql+psycopg2://insect_keys:")
    assert {"BENTO_URL", "STACK_KEYS", "MLFLOW_TRACKING_PASSWORD"} <= set(exports)
    assert not [name for name in exports if name.startswith(("AWS_", "MLFLOW_S3_", "INSECT_FEEDBACK__S3_"))]
    stack_secrets = json.loads((tmp_path / "data" / "stack" / "secrets.json").read_text())
    theirs = {"mlflow_reviewer_password", "feedback_keys_db_password"}
    assert not [name for name, secret in stack_secrets.items() if name not in theirs and secret in done.stdout]


def test_airflow_admin_creates_the_fab_login_without_its_password_in_an_argument(tmp_path):
    """Airflow with the FAB auth manager (compose, Kubernetes) on a fresh database: after
    `python -m config airflow-admin`, `admin` is an Admin whose password is the given one, and
    running it again with another password changes it."""
    fab = {
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path / 'airflow.db'}",
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    airflow = os.path.join(os.path.dirname(sys.executable), "airflow")
    migrated = subprocess.run([airflow, "db", "migrate"], env={**os.environ, **fab}, capture_output=True, text=True, check=False)
    assert migrated.returncode == 0, migrated.stderr[-2000:]
    for password in ("first-admin-password", "second-admin-password"):
        done = run(tmp_path, "config", "airflow-admin", AIRFLOW_ADMIN_PASSWORD=password, **fab)
        assert done.returncode == 0, done.stderr
        assert password not in done.stdout + done.stderr
        check = (
            "from airflow.providers.fab.auth_manager.cli_commands.utils import get_application_builder\n"
            "from werkzeug.security import check_password_hash\n"
            "with get_application_builder() as builder:\n"
            "    user = builder.sm.find_user(username='admin')\n"
            f"    print([r.name for r in user.roles], check_password_hash(user.password, {password!r}))"
        )
        checked = subprocess.run(
            [sys.executable, "-c", check], env={**os.environ, **fab}, capture_output=True, text=True, check=False
        )
        assert checked.stdout.strip().splitlines()[-1] == "['Admin'] True", checked.stderr[-2000:]
    refused = run(tmp_path, "config", "airflow-admin", AIRFLOW_ADMIN_PASSWORD="", **fab)
    assert refused.returncode == 2 and "AIRFLOW_ADMIN_PASSWORD" in refused.stderr
