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


def test_config_show_hides_the_database_password(tmp_path):
    url = "postgresql+psycopg2://insect:s3cret-pw@127.0.0.1:5434/insect"
    done = run(tmp_path, "config", "show", INSECT_FEEDBACK__DATABASE_URL=url)
    assert done.returncode == 0 and "s3cret-pw" not in done.stdout
    assert json.loads(done.stdout)["feedback"]["database_url"] == "postgresql+psycopg2://insect:***@127.0.0.1:5434/insect"


def test_stack_env_points_a_shell_at_the_stack(tmp_path):
    done = run(tmp_path, "stack", "env", INSECT_STACK__MLFLOW_PORT="5055")
    exports = dict(line.removeprefix("export ").split("=", 1) for line in done.stdout.splitlines() if line.startswith("export"))
    assert exports["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5055"
    assert exports["INSECT_FEEDBACK__DATABASE_URL"].startswith("postgresql+psycopg2://insect:")
    assert {"INSECT_FEEDBACK__S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(exports)
