"""`make up` / `make down`: the real services, started on a fresh data directory."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import httpx
import mlflow
import psutil
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from config import REPO_ROOT, Settings, get_settings
from stack import Stack
from stack import secrets as stack_secrets
from stack.layout import Layout
from stack.services import services
from tests.support import TINY_ENV, free_port

ARTIFACTS = REPO_ROOT / "test-artifacts" / "stack"  # screenshots and timings, kept by CI


def test_secrets_are_generated_once_and_readable_only_by_their_owner(tmp_path):
    path = tmp_path / "stack" / "secrets.json"
    first = stack_secrets.load_or_create(path)
    assert set(first) == set(stack_secrets.NAMES) and len(set(first.values())) == len(first)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stack_secrets.load_or_create(path) == first
    path.write_text(json.dumps({"redis_password": "kept"}))  # a file from an older version
    assert stack_secrets.load_or_create(path)["redis_password"] == "kept" and set(json.loads(path.read_text())) == set(first)


def s3_service(layout: Layout) -> subprocess.Popen:
    """The stack's S3 server of MLflow's artifacts alone, started as supervisord starts it, healthy."""
    service = next(service for service in services(layout) if service.name == "s3-mlflow")
    service.before_start()
    process = subprocess.Popen(service.command, cwd=REPO_ROOT)
    deadline = time.monotonic() + 30
    while not service.healthy():
        assert process.poll() is None and time.monotonic() < deadline, "the S3 service did not come up"
        time.sleep(0.2)
    return process


def test_the_s3_service_keeps_a_multipart_object_across_a_restart_and_lets_in_only_its_key(tmp_path):
    """moto's recording lost every object uploaded in parts (files over 8 MB) on replay."""
    layout = Layout(Settings(data_dir=tmp_path, stack={"s3_port": free_port()}))
    process = s3_service(layout)
    assert layout.secrets["s3_mlflow_secret_key"] not in " ".join(psutil.Process(process.pid).cmdline())
    s3 = s3_client(layout, layout.secrets["s3_mlflow_secret_key"])
    big = tmp_path / "model_cuda_sm_90.so"
    big.write_bytes(os.urandom(21 * 2**20))
    s3.upload_file(str(big), "mlflow", "1/artifacts/model.so", Config=TransferConfig(multipart_threshold=8 * 2**20))
    process.terminate()
    process.wait(30)

    process = s3_service(layout)
    try:
        copy = tmp_path / "copy.so"
        s3.download_file("mlflow", "1/artifacts/model.so", str(copy))
        assert hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(big.read_bytes()).digest()
        with pytest.raises(ClientError, match="403"):
            s3_client(layout, "not-the-key").head_bucket(Bucket="mlflow")
    finally:
        process.terminate()
        process.wait(30)


def s3_client(layout: Layout, secret_key: str, server: str = "s3-mlflow"):
    """A client of one of the stack's S3 servers, as the one user it lets in (with its key or another)."""
    return boto3.client(
        "s3",
        endpoint_url=layout.url(server),
        region_name="us-east-1",
        aws_access_key_id=layout.s3_login(layout.s3_servers()[server].user)["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=secret_key,
    )


@pytest.fixture
def stack_env(monkeypatch):
    """A fresh data directory and free ports (in /tmp: PostgreSQL runs as `postgres` when we are root)."""
    data = Path(tempfile.mkdtemp(prefix="insect-stack-"))
    os.chmod(data, 0o755)
    names = ("POSTGRES", "S3", "S3_FEEDBACK", "S3_FEEDBACK_READ", "MLFLOW", "AIRFLOW", "REDIS")
    ports = {f"INSECT_STACK__{name}_PORT": free_port() for name in names}
    ports["INSECT_SERVE__PORT"] = free_port()
    env = {**os.environ, "INSECT_DATA_DIR": str(data / "data"), **{k: str(v) for k, v in ports.items()}}
    # a clean shell's: supervisord passes `make up`'s environment on to every service (the tests'
    # own AWS keys, from conftest, would reach all of them)
    stray = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AIRFLOW_HOME")
    for key in (*stray, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        env.pop(key, None)
    yield env, ports
    subprocess.run([sys.executable, "-m", "stack", "down"], env=env, cwd=REPO_ROOT, check=False)
    shutil.rmtree(data, ignore_errors=True)
    get_settings.cache_clear()


def make(target: str, env: dict) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "stack", target], check=False, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def command_line(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):  # a short-lived one, gone already
        return ""


def assert_each_service_holds_only_its_secrets(processes: list[psutil.Process], secrets: list[str]) -> None:
    """supervisord, whose environment every service inherits, holds no secret; the Bento's workers
    hold no Airflow secret nor any of the MLflow server's (its S3 key above all), log into MLflow
    as `bento` and into S3 as its own user; the MLflow server holds neither the feedback database's
    nor Airflow's; only Celery's workers (CeleryExecutor) hold the tasks' secrets; a Celery worker
    cannot mint Airflow API tokens; the DAG processor and the triggerer hold Airflow's database
    alone; each S3 server lets in one user."""
    airflow = {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY"}
    tokens = {"AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY"}
    tasks = {"MLFLOW_TRACKING_PASSWORD", "INSECT_FEEDBACK__DATABASE_URL", "AWS_SECRET_ACCESS_KEY"}
    mlflow_server = {"MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"}
    refused = {
        "supervisord": set(),
        "_bentoml_impl.worker.service": airflow | mlflow_server | {"MLFLOW_S3_ENDPOINT_URL"},
        "mlflow server": {"INSECT_FEEDBACK__DATABASE_URL", "MLFLOW_TRACKING_PASSWORD", *airflow},
        "celery worker": tokens,
        # (the API server retitles itself, which blanks its environment in /proc: tests/system/
        # test_stack_s3.py checks the one it is given)
        "airflow scheduler": tasks | {"AIRFLOW__API__SECRET_KEY"},  # with CeleryExecutor its tasks run elsewhere
        "airflow dag-processor": tasks | tokens | {"AIRFLOW__CELERY__BROKER_URL"},
        "airflow triggerer": tasks | tokens | {"AIRFLOW__CELERY__BROKER_URL"},
        "serve s3": {"AWS_SECRET_ACCESS_KEY"},
    }
    s3_user = {"_bentoml_impl.worker.service": "insect-bento", "mlflow server": "insect-mlflow"}
    s3_user["celery worker"] = "insect-airflow"
    seen, s3_servers = set(), []
    for process in processes:
        line = command_line(process)
        for service, names in refused.items():
            if service in line:
                try:
                    environment = process.environ()
                except (psutil.NoSuchProcess, psutil.ZombieProcess):
                    continue
                seen.add(service)
                assert not set(environment) & names, f"{service} holds {sorted(set(environment) & names)}"
                if service == "supervisord":
                    assert not [v for v in environment.values() if any(secret in v for secret in secrets)]
                if service.startswith("_bentoml"):
                    assert environment["MLFLOW_TRACKING_USERNAME"] == "bento"
                if service in s3_user:
                    assert environment["AWS_ACCESS_KEY_ID"] == s3_user[service], service
                if service == "serve s3":  # one key pair: '"<access key>,<secret key>"'
                    s3_servers.append(environment["RCLONE_AUTH_KEY"].strip('"').split(",")[0])
    assert seen == set(refused), seen
    assert sorted(s3_servers) == ["insect-airflow", "insect-bento", "insect-mlflow"], s3_servers


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


def eventually(condition, timeout_s: float, what: str, stack_dir: Path):
    """Poll until `condition()` returns something truthy; on timeout, show the scheduler's log end."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            log = (stack_dir / "logs" / "airflow-scheduler.log").read_text()[-3000:]
            pytest.fail(f"{what}: not within {timeout_s:.0f} s. Scheduler log ends:\n{log}")
        time.sleep(3)
    return result


def airflow_api(stack: Stack) -> httpx.Client:
    """Airflow's REST API as the admin user, with a token from /auth/token."""
    login = {"username": "admin", "password": stack.secrets["airflow_admin_password"]}
    token = httpx.post(f"{stack.url('airflow')}/auth/token", json=login, timeout=30).raise_for_status().json()["access_token"]
    return httpx.Client(base_url=f"{stack.url('airflow')}/api/v2", headers={"Authorization": f"Bearer {token}"}, timeout=30)


def dag_runs(stack: Stack, dag_id: str) -> list[dict]:
    with airflow_api(stack) as api:
        runs = sorted(api.get(f"/dags/{dag_id}/dagRuns").raise_for_status().json()["dag_runs"], key=lambda run: run["queued_at"])
    failed = [run["dag_run_id"] for run in runs if run["state"] == "failed"]
    assert not failed, f"{dag_id} failed: {failed} (task logs under {stack.logs / 'airflow'})"
    return runs


def served_version(stack: Stack) -> str | None:
    client_key = (stack.keys / "client.key").read_text().strip()
    try:
        response = httpx.post(f"{stack.url('bento')}/model", headers={"Authorization": f"Bearer {client_key}"}, timeout=30)
    except httpx.HTTPError:
        return None
    return response.json()["version"] if response.status_code == 200 else None


def tasks_done_by_workers(stack: Stack) -> dict[str, int]:
    """How many Airflow tasks each Celery worker finished, from its own log."""
    return {log.stem: log.read_text().count("succeeded in") for log in sorted(stack.logs.glob("airflow-worker-*.log"))}


@pytest.mark.stack
@pytest.mark.slow
def test_scheduler_drives_the_loop_on_celery_and_down_leaves_nothing_behind(stack_env, tiny_dataset, monkeypatch, browser):
    """Fresh data dir -> `make up` (CeleryExecutor, 2 workers) -> the scheduler trains the first
    model (the retrain DAG's latest weekly slot, run when the DAG appears) -> users send feedback
    to the Bento -> the scheduler's ingest run publishes a dataset version -> its Asset event runs
    retrain -> a new version in the Postgres-backed MLflow server, artifacts in S3 -> a promotion
    through MLflow's REST API is served without a restart -> both UIs in Chromium -> `make down`
    leaves nothing running -> after `make up` again the registry and the buckets hold everything."""
    env, ports = stack_env
    env.update(
        TINY_ENV,
        INSECT_DATASET_DIR=str(tiny_dataset),
        INSECT_FEEDBACK__INGEST_SCHEDULE="* * * * *",
        INSECT_FEEDBACK__MIN_NEW_SAMPLES="4",
        INSECT_SERVE__RELOAD_INTERVAL_S="2",
        INSECT_STACK__EXECUTOR="celery",
        INSECT_STACK__WORKERS="2",
        INSECT_COMPILE__CUDA_ARCHS="[]",
    )  # the CUDA cross-compile has a test of its own
    for key, value in env.items():
        if key.startswith("INSECT_"):
            monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    stack = Stack(get_settings())
    bento, name = stack.url("bento"), stack.settings.registered_model_name

    started = time.monotonic()
    out = make("up", env)
    timings = {"make up to healthy, s": round(time.monotonic() - started)}
    assert "all healthy" in out and "Airflow UI" in out and "password in" in out
    assert "already running" in make("up", env)  # a second `make up` is harmless
    processes = stack_processes(env["INSECT_DATA_DIR"])
    secrets = [value for value in stack.secrets.values() if len(value) >= 8]
    assert not [secret for secret in secrets if secret in out], "make up printed a secret"
    in_argv = [line for line in map(command_line, processes) if any(secret in line for secret in secrets)]
    assert not in_argv, f"a secret in a command line: {[line.split()[0] for line in in_argv]}"
    assert_each_service_holds_only_its_secrets(processes, secrets)
    # every listener of the stack, by port and by process, from the system's socket table: on 127.0.0.1 only
    table = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
    pids = {p.pid for p in processes}
    listeners = {(c.laddr.ip, c.laddr.port) for c in table if c.laddr.port in ports.values() or c.pid in pids}
    assert {port for _, port in listeners} >= set(ports.values())
    assert {ip for ip, _ in listeners} <= {"127.0.0.1", "::1"}, f"listening beyond this machine: {sorted(listeners)}"
    timings["stack resident memory, MiB"] = round(sum(p.memory_info().rss for p in processes) / 2**20)
    timings["stack processes"] = len(processes)

    assert httpx.post(f"{bento}/model", timeout=30).status_code == 401  # no key, no answer
    eventually(lambda: served_version(stack) == "1", 900, "the first model, served", stack.dir)
    assert f"bento                  running, healthy, ready, serving {name} v1 (" in make("status", env)
    loop_started = time.monotonic()
    feedback_round = subprocess.run(
        [
            sys.executable,
            "scripts/feedback_round.py",
            "--url",
            bento,
            "--photos",
            "4",
            "--key-file",
            str(stack.keys / "labeler.key"),
        ],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert feedback_round.returncode == 0, feedback_round.stderr

    client = logged_into_mlflow(stack, monkeypatch)
    eventually(
        lambda: (
            any(v.version == "2" for v in client.search_model_versions(f"name='{name}'"))
            and all(run["state"] == "success" for run in dag_runs(stack, "retrain"))
        ),
        900,
        "a second version, retrained on the feedback",
        stack.dir,
    )
    timings["feedback to a new registered version, s"] = round(time.monotonic() - loop_started)
    assert any(run["run_type"] == "scheduled" and run["state"] == "success" for run in dag_runs(stack, "ingest_feedback"))
    assert [run["run_type"] for run in dag_runs(stack, "retrain")] == ["scheduled", "asset_triggered"]
    done = tasks_done_by_workers(stack)
    assert set(done) == {"airflow-worker-1", "airflow-worker-2"} and sum(done.values()) > 0, done
    s3 = s3_client(stack, stack.secrets["s3_mlflow_secret_key"])
    assert any(obj["Key"].endswith(".so") for obj in s3.list_objects_v2(Bucket="mlflow")["Contents"])  # model artifacts
    photos = s3_client(stack, stack.secrets["s3_airflow_secret_key"], "s3-feedback-read")  # as the tasks read them
    assert photos.list_objects_v2(Bucket="feedback")["KeyCount"] > 0  # the users' photos
    # the clients reach model files through MLflow's server (--serve-artifacts), never its bucket
    versions = client.search_model_versions(f"name='{name}'")
    uris = {client.get_run(v.run_id).info.artifact_uri for v in versions} | {v.source for v in versions}
    uris |= {client.get_experiment_by_name(stack.settings.experiment_name).artifact_location}
    uris |= {client.get_logged_model(v.model_id).artifact_location for v in versions if v.model_id}
    assert all(uri.startswith(("mlflow-artifacts:/", "models:/")) for uri in uris), uris

    target = "1" if client.get_model_version_by_alias(name, "champion").version == "2" else "2"
    client.set_registered_model_alias(name, "champion", target)  # what the MLflow UI does, over REST
    eventually(lambda: served_version(stack) == target, 120, f"v{target} served after its promotion", stack.dir)
    see_the_uis(browser, stack, name)
    run_readme_stack_blocks(env)
    champion = client.get_model_version_by_alias(name, "champion")
    big = Path(tempfile.mkdtemp()) / "over-the-multipart-threshold.bin"
    big.write_bytes(os.urandom(21 * 2**20))  # S3 takes it in parts: moto's replay lost such files
    for key, value in stack.mlflow_login("airflow").items():  # the run's owner; the reviewer may not write runs
        monkeypatch.setenv(key, value)
    client.log_artifact(champion.run_id, str(big), "extra")
    before = artifact_digests(stack.url("mlflow"), name, champion)
    assert "run/extra/over-the-multipart-threshold.bin" in before

    make("down", env)
    assert stack_processes(env["INSECT_DATA_DIR"]) == []
    assert [port for port in ports.values() if listening(port)] == []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "timings.json").write_text(json.dumps(timings | {"tasks by worker": done}, indent=2))

    make("up", env)
    assert len(client.search_model_versions(f"name='{name}'")) == 2
    assert photos.list_objects_v2(Bucket="feedback")["KeyCount"] > 0
    assert artifact_digests(stack.url("mlflow"), name, champion) == before
    eventually(lambda: served_version(stack) == champion.version, 120, "the champion served again", stack.dir)
    make("down", env)
    assert stack_processes(env["INSECT_DATA_DIR"]) == []
    assert [port for port in ports.values() if listening(port)] == []


def artifact_digests(tracking_uri: str, name: str, version) -> dict[str, str]:
    """sha256 of every file of a registered version: its model's artifacts and its run's."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    digests = {}
    with _use_tracking_uri(tracking_uri):  # MLflow resolves models:/ URIs through the global URI only
        for label, source in (("model", f"models:/{name}/{version.version}"), ("run", f"runs:/{version.run_id}/")):
            root = Path(mlflow.artifacts.download_artifacts(source, dst_path=tempfile.mkdtemp()))
            for path in (p for p in root.rglob("*") if p.is_file()):
                digests[f"{label}/{path.relative_to(root)}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def run_readme_stack_blocks(env: dict) -> None:
    """Every README block marked for the stack, as a user runs it: in a shell pointed at the stack
    (`eval "$(python -m stack env)"`); each command must succeed."""
    blocks = re.findall(r"<!-- stack-test -->\n```bash\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2
    for block in blocks:
        script = f'set -euo pipefail\nsource .venv/bin/activate && eval "$(python -m stack env)"\n{block}'
        done = subprocess.run(
            ["bash", "-c", script], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False
        )
        assert done.returncode == 0, f"README block failed:\n{block}\n{done.stdout}\n{done.stderr}"


def see_the_uis(browser, stack: Stack, model_name: str) -> None:
    """Log into Airflow's UI and open the retrain DAG's runs; open the model and its aliases in
    MLflow's UI; a screenshot of each."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as shown
    from selenium.webdriver.support.ui import WebDriverWait

    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def shows(xpath: str, screenshot: str) -> None:
        try:
            WebDriverWait(browser, 60).until(shown.presence_of_element_located((By.XPATH, xpath)))
        finally:  # what the page showed, found or not
            browser.save_screenshot(str(ARTIFACTS / screenshot))

    assert httpx.get(f"{stack.url('airflow')}/api/v2/dags", timeout=30).status_code == 401  # no token, no answer
    browser.get(stack.url("airflow"))
    shows("//input[@name='username']", "airflow-login.png")
    browser.find_element(By.NAME, "username").send_keys("admin")
    browser.find_element(By.NAME, "password").send_keys(stack.secrets["airflow_admin_password"])
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(browser, 60).until(lambda b: "/auth/login" not in b.current_url)
    browser.get(f"{stack.url('airflow')}/dags/retrain/runs")
    shows("//*[text()[contains(., 'asset_triggered__')]]", "airflow-retrain-runs.png")

    browser.get(f"{stack.url('mlflow')}/#/models/{model_name}")  # without a login: a browser login prompt
    assert "champion" not in browser.page_source and httpx.get(stack.url("mlflow"), timeout=30).status_code == 401
    login = stack.mlflow_login("reviewer")  # what the browser sends once a person fills its login prompt
    basic = base64.b64encode(f"{login['MLFLOW_TRACKING_USERNAME']}:{login['MLFLOW_TRACKING_PASSWORD']}".encode()).decode()
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {basic}"}})
    browser.get(f"{stack.url('mlflow')}/#/models/{model_name}")
    shows("//*[text()[contains(., 'champion')]]", "mlflow-model-aliases.png")  # the alias tag, "@ champion"


def logged_into_mlflow(stack: Stack, monkeypatch) -> mlflow.MlflowClient:
    """MLflow answers nobody without a login and lets the Bento's only read; the test's own
    client then logs in as the reviewer, who may promote."""
    search = f"{stack.url('mlflow')}/api/2.0/mlflow/registered-models/search"
    assert httpx.get(search, timeout=30).status_code == 401
    bento = stack.mlflow_login("bento")
    as_bento = (bento["MLFLOW_TRACKING_USERNAME"], bento["MLFLOW_TRACKING_PASSWORD"])
    assert httpx.get(search, auth=as_bento, timeout=30).status_code == 200
    alias = {"name": stack.settings.registered_model_name, "alias": "champion", "version": "1"}
    moved = httpx.post(f"{stack.url('mlflow')}/api/2.0/mlflow/registered-models/alias", json=alias, auth=as_bento, timeout=30)
    assert moved.status_code == 403, moved.text
    for key, value in stack.mlflow_login("reviewer").items():
        monkeypatch.setenv(key, value)
    return mlflow.MlflowClient(stack.url("mlflow"))


def test_the_celery_executor_loads_with_the_locked_celery():
    """Celery 5.7 dropped a name the Celery provider imports: the scheduler died at start."""
    from airflow.providers.celery.executors.celery_executor import CeleryExecutor

    assert CeleryExecutor.__name__ == "CeleryExecutor"
