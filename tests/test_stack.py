"""`make up` / `make down`: the real services, started on a fresh data directory."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import boto3
import psutil
import pytest

from config import REPO_ROOT
from stack import secrets as stack_secrets
from tests.support import free_port


def test_secrets_are_generated_once_and_readable_only_by_their_owner(tmp_path):
    path = tmp_path / "stack" / "secrets.json"
    first = stack_secrets.load_or_create(path)
    assert set(first) == set(stack_secrets.NAMES) and len(set(first.values())) == len(first)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stack_secrets.load_or_create(path) == first
    path.write_text(json.dumps({"s3_access_key": "kept"}))  # a file from an older version
    assert stack_secrets.load_or_create(path)["s3_access_key"] == "kept" and set(json.loads(path.read_text())) == set(first)


@pytest.fixture
def stack_env(monkeypatch):
    """A fresh data directory and free ports (in /tmp: PostgreSQL runs as `postgres` when we are root)."""
    data = Path(tempfile.mkdtemp(prefix="insect-stack-"))
    os.chmod(data, 0o755)
    ports = {"INSECT_STACK__POSTGRES_PORT": free_port(), "INSECT_STACK__S3_PORT": free_port(),
             "INSECT_STACK__MLFLOW_PORT": free_port(), "INSECT_STACK__AIRFLOW_PORT": free_port(), "INSECT_SERVE__PORT": free_port()}
    env = {**os.environ, "INSECT_DATA_DIR": str(data / "data"), **{k: str(v) for k, v in ports.items()}}
    for key in ("MLFLOW_TRACKING_URI", "AIRFLOW_HOME"):
        env.pop(key, None)
    yield env, ports
    subprocess.run([sys.executable, "-m", "stack", "down"], env=env, cwd=REPO_ROOT, check=False)
    shutil.rmtree(data, ignore_errors=True)


def make(target: str, env: dict) -> str:
    done = subprocess.run([sys.executable, "-m", "stack", target], check=False, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def stack_processes(data_dir: str) -> list[psutil.Process]:
    """Every process started by the stack: they all inherit its INSECT_DATA_DIR."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get("INSECT_DATA_DIR") == data_dir:
                found.append(process)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return found


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.stack
@pytest.mark.slow
def test_up_is_idempotent_down_leaves_nothing_running_and_data_survives(stack_env):
    env, ports = stack_env
    out = make("up", env)
    assert "all healthy" in out and "Airflow UI" in out and "password" in out
    assert "already running" in make("up", env)  # a second `make up` is harmless
    secrets = json.loads((Path(env["INSECT_DATA_DIR"]) / "stack" / "secrets.json").read_text())
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{ports['INSECT_STACK__S3_PORT']}", region_name="us-east-1",
                      aws_access_key_id=secrets["s3_access_key"], aws_secret_access_key=secrets["s3_secret_key"])
    s3.put_object(Bucket="feedback", Key="kept.txt", Body=b"survives make down")
    import mlflow

    client = mlflow.MlflowClient(f"http://127.0.0.1:{ports['INSECT_STACK__MLFLOW_PORT']}")
    client.create_registered_model("survivor")

    make("down", env)
    assert stack_processes(env["INSECT_DATA_DIR"]) == []
    assert [port for port in ports.values() if listening(port)] == []

    make("up", env)
    assert s3.get_object(Bucket="feedback", Key="kept.txt")["Body"].read() == b"survives make down"
    assert client.get_registered_model("survivor").name == "survivor"
    make("down", env)
    assert stack_processes(env["INSECT_DATA_DIR"]) == []
