"""Least privilege in `make up`: each service holds only its own secrets, and rclone's S3 servers,
started as the stack starts them, let each S3 user do its part of the storage and nothing more."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import boto3
import psutil
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from config import REPO_ROOT, Settings
from config.ports import free_port
from stack.layout import Layout
from stack.services import Service, services
from tests.support import PARSE_WITHOUT_CONNECTIONS

DAGS = REPO_ROOT / "dags"
EXECUTORS = ("LocalExecutor", "CeleryExecutor")


def environments(tmp_path, executor: str = "LocalExecutor") -> tuple[Layout, dict[str, dict[str, str]]]:
    """The stack's layout, and each service's own environment (on top of supervisord's)."""
    layout = Layout(Settings(data_dir=tmp_path, stack={"executor": executor}))
    return layout, {service.name: service.environment for service in services(layout)}


def holds(environment: dict[str, str], secret: str) -> bool:
    return any(secret in value for value in environment.values())


# -- who holds what --------------------------------------------------------------------------------


@pytest.mark.parametrize("executor", EXECUTORS)
def test_only_mlflows_server_holds_the_key_to_its_bucket_and_the_bento_none_of_its_secrets(tmp_path, executor):
    layout, env = environments(tmp_path, executor)
    assert env["bento"]["AWS_SECRET_ACCESS_KEY"] != env["mlflow"]["AWS_SECRET_ACCESS_KEY"]  # one key pair for both, before
    mlflow_key = layout.secrets["s3_mlflow_secret_key"]
    assert {name for name, environment in env.items() if holds(environment, mlflow_key)} == {"mlflow"}
    assert not holds(layout.environment(), mlflow_key)  # supervisord's, which every program inherits
    bento = env["bento"]
    server = ("mlflow_db_password", "mlflow_admin_password", "mlflow_flask_secret_key", "s3_mlflow_secret_key")
    tasks = ("mlflow_airflow_password", "s3_airflow_secret_key")
    assert not [name for name in server + tasks if holds(bento, layout.secrets[name])]
    assert not set(bento) & {"MLFLOW_S3_ENDPOINT_URL", "MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_ADMIN_PASSWORD"}
    assert bento["AWS_ACCESS_KEY_ID"] == "insect-bento" and bento["MLFLOW_TRACKING_USERNAME"] == "bento"
    assert bento["INSECT_FEEDBACK__S3_ENDPOINT_URL"] == layout.url("s3-feedback")
    # nobody but MLflow's server is pointed at its bucket: the others get artifacts through MLflow
    assert [name for name, environment in env.items() if "MLFLOW_S3_ENDPOINT_URL" in environment] == ["mlflow"]
    assert env["mlflow"]["MLFLOW_S3_ENDPOINT_URL"] == layout.url("s3-mlflow")


@pytest.mark.parametrize("executor", EXECUTORS)
def test_only_the_airflow_processes_that_run_tasks_hold_the_tasks_secrets(tmp_path, executor):
    """The `airflow` MLflow login may promote; with the feedback storage it goes to the scheduler
    only under LocalExecutor (its tasks are its subprocesses), else to the Celery workers."""
    layout, env = environments(tmp_path, executor)
    task_secrets = [layout.secrets[name] for name in ("mlflow_airflow_password", "s3_airflow_secret_key", "feedback_db_password")]
    airflow = {name: environment for name, environment in env.items() if name.startswith("airflow-")}
    runners = {name for name in airflow if name.startswith("airflow-worker-")} if layout.celery else {"airflow-scheduler"}
    assert runners and runners < set(airflow)
    for name, environment in airflow.items():
        held = [secret for secret in task_secrets if holds(environment, secret)]
        assert held == (task_secrets if name in runners else []), name
        assert ("MLFLOW_TRACKING_PASSWORD" in environment) == (name in runners), name
        assert ("AWS_SECRET_ACCESS_KEY" in environment) == (name in runners), name
        if name in runners:
            assert environment["AWS_ACCESS_KEY_ID"] == "insect-airflow"
            assert environment["INSECT_FEEDBACK__S3_ENDPOINT_URL"] == layout.url("s3-feedback-read")
    database, jwt, api_key = "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY"
    assert set(airflow["airflow-dag-processor"]) == set(airflow["airflow-triggerer"]) == {database}
    assert set(airflow["airflow-api-server"]) == {database, jwt, api_key}  # checks the tasks' tokens, serves the UI
    assert jwt in airflow["airflow-scheduler"] and api_key not in airflow["airflow-scheduler"]  # signs the tokens
    assert not [name for name in runners - {"airflow-scheduler"} if {jwt, api_key} & set(airflow[name])]


def test_the_dag_processors_environment_parses_every_dag_without_a_connection(tmp_path):
    """The DAG processor holds Airflow's database and nothing else: the DAG files need no more."""
    layout, env = environments(tmp_path)
    ambient = ("INSECT_", "MLFLOW_", "AWS_", "AIRFLOW")  # this shell's settings: only the stack's count
    environment = {key: value for key, value in os.environ.items() if not key.startswith(ambient)}
    environment |= layout.environment() | env["airflow-dag-processor"]
    parsed = subprocess.run(
        [sys.executable, "-c", PARSE_WITHOUT_CONNECTIONS, str(DAGS)],
        capture_output=True,
        text=True,
        check=False,
        env=environment,
        cwd=REPO_ROOT,
    )
    assert parsed.returncode == 0, parsed.stdout[-3000:] + parsed.stderr[-3000:]
    assert "['drift_watch', 'ingest_feedback', 'retrain']" in parsed.stdout


# -- the S3 servers, for real ----------------------------------------------------------------------


def start(service: Service) -> subprocess.Popen:
    """One service of the stack, set up and started as supervisord starts it, healthy."""
    service.before_start()
    process = subprocess.Popen(service.command, cwd=REPO_ROOT)
    deadline = time.monotonic() + 30
    while not service.healthy():
        assert process.poll() is None and time.monotonic() < deadline, f"{service.name} did not come up"
        time.sleep(0.2)
    return process


@pytest.fixture(scope="module")
def s3_stack(tmp_path_factory) -> Iterator[tuple[Layout, dict[str, subprocess.Popen]]]:
    """The stack's S3 servers over a data directory an earlier stack left: its objects where it
    kept them, `s3/<bucket>/<key>`. Shared by the tests below, which write different keys."""
    ports = {name: free_port() for name in ("s3_port", "s3_feedback_port", "s3_feedback_read_port")}
    layout = Layout(Settings(data_dir=tmp_path_factory.mktemp("data"), stack=ports))
    for key, data in (("mlflow/1/artifacts/model.pkl", b"weights"), ("feedback/feedback/ab/ab01.jpg", b"photo")):
        (layout.s3_dir / key).parent.mkdir(parents=True, exist_ok=True)
        (layout.s3_dir / key).write_bytes(data)
    processes = {}
    try:
        for service in services(layout):
            if service.name in layout.s3_servers():
                processes[service.name] = start(service)
        yield layout, processes
    finally:
        for process in processes.values():
            process.terminate()
            process.wait(30)


def client(layout: Layout, server: str, user: str):
    """An S3 client of `server`, signed with `user`'s key pair; one try per request."""
    login = layout.s3_login(user)
    return boto3.client(
        "s3",
        endpoint_url=layout.url(server),
        aws_access_key_id=login["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=login["AWS_SECRET_ACCESS_KEY"],
        region_name=login["AWS_DEFAULT_REGION"],
        config=Config(retries={"max_attempts": 1}),
    )


def refused(call, *args, **kwargs) -> str:
    """The error code S3 answers a call that must fail."""
    with pytest.raises(ClientError) as error:
        call(*args, **kwargs)
    return error.value.response["Error"]["Code"]


def test_the_bentos_key_can_neither_read_nor_write_mlflows_bucket_while_mlflows_can(s3_stack):
    layout, _ = s3_stack
    mlflow = client(layout, "s3-mlflow", "mlflow")
    assert mlflow.get_object(Bucket="mlflow", Key="1/artifacts/model.pkl")["Body"].read() == b"weights"  # kept
    mlflow.put_object(Bucket="mlflow", Key="2/artifacts/model.pkl", Body=b"new weights")
    for user in ("bento", "airflow"):  # MLflow's server lets in no other key
        outsider = client(layout, "s3-mlflow", user)
        assert refused(outsider.head_bucket, Bucket="mlflow") == "403"
        assert refused(outsider.get_object, Bucket="mlflow", Key="1/artifacts/model.pkl") == "InvalidAccessKeyId"
        assert refused(outsider.put_object, Bucket="mlflow", Key="1/artifacts/model.pkl", Body=b"x") == "InvalidAccessKeyId"
        assert refused(outsider.delete_object, Bucket="mlflow", Key="1/artifacts/model.pkl") == "InvalidAccessKeyId"
    # nor is the bucket, or a way to make it, on the servers that let the Bento and the tasks in
    for server, user in (("s3-feedback", "bento"), ("s3-feedback-read", "airflow")):
        own = client(layout, server, user)
        assert [bucket["Name"] for bucket in own.list_buckets()["Buckets"]] == ["feedback"]
        assert refused(own.get_object, Bucket="mlflow", Key="1/artifacts/model.pkl") == "NoSuchBucket"
        assert refused(own.put_object, Bucket="mlflow", Key="1/artifacts/model.pkl", Body=b"x") == "NoSuchBucket"
        refused(own.create_bucket, Bucket="mlflow")
    assert (layout.s3_dir / "mlflow" / "1" / "artifacts" / "model.pkl").read_bytes() == b"weights"
    assert (layout.s3_dir / "mlflow" / "2" / "artifacts" / "model.pkl").read_bytes() == b"new weights"
    assert sorted(p.name for p in layout.s3_dir.iterdir()) == ["feedback", "mlflow"]


def test_the_bento_writes_photos_under_its_prefix_only_and_the_tasks_read_them_read_only(s3_stack):
    layout, _ = s3_stack
    prefix = layout.settings.feedback.s3_prefix
    bento, tasks = client(layout, "s3-feedback", "bento"), client(layout, "s3-feedback-read", "airflow")
    bento.head_bucket(Bucket="feedback")  # the Bento's storage check
    bento.put_object(Bucket="feedback", Key=f"{prefix}/cd/cd02.jpg", Body=b"new photo", ContentType="image/jpeg")
    assert bento.get_object(Bucket="feedback", Key=f"{prefix}/ab/ab01.jpg")["Body"].read() == b"photo"  # kept
    for key in ("elsewhere.jpg", "other/cd02.jpg"):  # outside its prefix: nothing there to read or write
        refused(bento.put_object, Bucket="feedback", Key=key, Body=b"x")
        assert not (layout.s3_dir / "feedback" / key).exists()
    # the tasks read what the Bento stored at once (no listing cached from before), and write nothing
    tasks.head_bucket(Bucket="feedback")
    assert tasks.get_object(Bucket="feedback", Key=f"{prefix}/cd/cd02.jpg")["Body"].read() == b"new photo"
    assert refused(tasks.get_object, Bucket="feedback", Key=f"{prefix}/cd/none.jpg") == "NoSuchKey"
    refused(tasks.put_object, Bucket="feedback", Key=f"{prefix}/cd/cd02.jpg", Body=b"overwritten")
    refused(tasks.delete_object, Bucket="feedback", Key=f"{prefix}/ab/ab01.jpg")
    refused(tasks.create_bucket, Bucket="other")
    assert (layout.s3_dir / "feedback" / prefix / "cd" / "cd02.jpg").read_bytes() == b"new photo"
    assert (layout.s3_dir / "feedback" / prefix / "ab" / "ab01.jpg").read_bytes() == b"photo"
    # each server lets in its own user alone
    assert refused(client(layout, "s3-feedback", "airflow").head_bucket, Bucket="feedback") == "403"
    assert refused(client(layout, "s3-feedback-read", "bento").head_bucket, Bucket="feedback") == "403"


def test_each_s3_server_holds_only_its_users_key_and_none_in_its_command_line(s3_stack):
    layout, processes = s3_stack
    keys = {user: layout.s3_login(user)["AWS_SECRET_ACCESS_KEY"] for user in ("mlflow", "bento", "airflow")}
    for name, process in processes.items():
        rclone = psutil.Process(process.pid)  # `python -m stack.s3` became rclone
        assert rclone.name() == "rclone" and not [user for user, key in keys.items() if key in " ".join(rclone.cmdline())]
        environment = " ".join(rclone.environ().values())
        assert [user for user, key in keys.items() if key in environment] == [layout.s3_servers()[name].user]
