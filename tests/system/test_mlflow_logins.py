"""A real MLflow server behind its basic-auth app, given the logins of `python -m registry logins`:
nobody gets in without one, a service that reads cannot promote, the reviewer can."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import pytest
from mlflow.exceptions import MlflowException
from typer.testing import CliRunner

from benchmarks.fixtures import register_tiny_model
from config import get_settings
from registry import MANIFEST_TAG, SIGNATURE_TAG, champion_predict_fn, file_hashes, load_verified, signing, version_by_alias
from registry.__main__ import app
from registry.logins import USERS, auth_config
from registry.signing import UntrustedModelError
from tests.support import free_port

ADMIN_PASSWORD = "admin-password-for-the-test"
PASSWORDS = {user: f"{user}-password-for-the-test" for user in USERS}


@pytest.fixture
def mlflow_server(tmp_path) -> str:
    config = tmp_path / "basic_auth.ini"
    config.write_text(auth_config(f"sqlite:///{tmp_path / 'users.db'}"))
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-key-for-the-test",
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--app-name", "basic-auth", "--port", str(port)]
    command += ["--host", "127.0.0.1", "--workers", "1", "--artifacts-destination", str(tmp_path / "artifacts")]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _answers(f"{url}/health"):
            assert server.poll() is None and time.monotonic() < deadline, "the MLflow server did not start"
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _log_in(monkeypatch, user: str) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORDS[user])


def test_only_logins_get_in_the_services_read_and_the_reviewer_promotes(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_ADMIN_PASSWORD", ADMIN_PASSWORD)
    for user, password in PASSWORDS.items():
        monkeypatch.setenv(f"MLFLOW_{user.upper()}_PASSWORD", password)
    monkeypatch.setenv("MLFLOW_REVIEWER_PASSWORD", "an-old-reviewer-password")
    assert CliRunner().invoke(app, ["logins"]).exit_code == 0
    monkeypatch.setenv("MLFLOW_REVIEWER_PASSWORD", PASSWORDS["reviewer"])  # rotated: run again
    created = CliRunner().invoke(app, ["logins"])
    assert created.exit_code == 0, created.output
    name = get_settings().registered_model_name
    mlflow.set_tracking_uri(mlflow_server)
    client = mlflow.MlflowClient()

    assert httpx.get(f"{mlflow_server}/api/2.0/mlflow/registered-models/search", timeout=10).status_code == 401
    _log_in(monkeypatch, "bento")  # before the first version: no champion yet, not a refusal
    assert version_by_alias(name, "champion") is None
    _log_in(monkeypatch, "airflow")  # the training pipeline: its run and its version
    mlflow.set_experiment("insect-test")
    with mlflow.start_run() as run:
        mlflow.log_param("epochs", 1)
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id).version

    _log_in(monkeypatch, "bento")
    assert client.get_model_version(name, version).run_id == run.info.run_id  # reads
    for write in (
        lambda: client.set_registered_model_alias(name, "champion", version),
        lambda: client.set_tag(run.info.run_id, "x", "y"),
    ):
        with pytest.raises(MlflowException, match="403") as refused:
            write()
        assert refused.value.error_code == "PERMISSION_DENIED"  # what the web app's promote answers 403 on

    _log_in(monkeypatch, "reviewer")
    client.set_registered_model_alias(name, "champion", version)
    assert client.get_model_version_by_alias(name, "champion").version == version
    with pytest.raises(MlflowException, match="403"):
        client.set_tag(run.info.run_id, "x", "y")  # promotes, does not rewrite the run


def test_logins_says_which_variables_are_missing(monkeypatch):
    monkeypatch.delenv("MLFLOW_ADMIN_PASSWORD", raising=False)
    refused = CliRunner().invoke(app, ["logins"])
    assert refused.exit_code == 2 and "MLFLOW_ADMIN_PASSWORD" in refused.output


class RunsACommand(mlflow.pyfunc.PythonModel):
    """A model whose pickle does something when loaded: writes `marker` (a shell command would do as well)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))

    def predict(self, context, model_input):
        return model_input


def test_a_version_the_reviewer_registers_and_hashes_is_never_loaded_but_the_reviewer_promotes_signed_ones(
    mlflow_server, monkeypatch, tmp_path, caplog
):
    """Today's attack on `make up`: the reviewer logs a pyfunc whose pickle runs code, registers it,
    tags it with a manifest of its own files (signed with a key of its own) and makes it champion."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("INSECT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MLFLOW_ADMIN_PASSWORD", ADMIN_PASSWORD)
    for user, password in PASSWORDS.items():
        monkeypatch.setenv(f"MLFLOW_{user.upper()}_PASSWORD", password)
    assert CliRunner().invoke(app, ["logins"]).exit_code == 0
    get_settings.cache_clear()
    settings, client = get_settings(), mlflow.MlflowClient(mlflow_server)
    name = settings.registered_model_name
    _log_in(monkeypatch, "airflow")  # the training pipeline registers and signs v1
    assert CliRunner().invoke(app, ["signing-key", "create"]).exit_code == 0
    classes = ["a", "b", "c"]
    register_tiny_model(classes, seed=0)

    _log_in(monkeypatch, "reviewer")
    marker = tmp_path / "ran"
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("reviewer's own")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="classifier", python_model=RunsACommand(marker), registered_model_name=name)
    planted = str(info.registered_model_version)
    marker.unlink(missing_ok=True)  # MLflow's own requirement inference loaded it, in the reviewer's process
    files = file_hashes(Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "planted"))))
    manifest = json.dumps({"name": name, "version": planted, "run_id": info.run_id, "files": files, "warm_start": None})
    signing.create_key(tmp_path / "reviewer.key", tmp_path / "reviewer.pub")
    client.set_model_version_tag(name, planted, MANIFEST_TAG, manifest)
    client.set_model_version_tag(name, planted, SIGNATURE_TAG, signing.sign(tmp_path / "reviewer.key", manifest.encode()))
    client.set_registered_model_alias(name, "champion", planted)

    _log_in(monkeypatch, "bento")  # what the Bento, evaluate and drift do with the champion
    with pytest.raises(UntrustedModelError, match=f"{name} v{planted}: signed by key"):
        load_verified(settings)
    assert champion_predict_fn(settings) is None and not marker.exists()

    _log_in(monkeypatch, "reviewer")  # promoting what the pipeline signed still works
    client.set_registered_model_alias(name, "champion", "1")
    _log_in(monkeypatch, "bento")
    assert load_verified(settings).version == "1" and not marker.exists()
    get_settings.cache_clear()
