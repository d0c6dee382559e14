"""Shared fixtures: a tiny synthetic dataset, settings isolated in a temp dir, and real PostgreSQL
and S3 servers on localhost."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import boto3
import pytest

from benchmarks.fixtures import redis_server
from config import Settings, SyntheticDataConfig, get_settings
from feedback import db, postgres
from ml.data.synthetic import generate_synthetic
from tests.support import TINY_ENV, free_port


def pytest_configure(config):
    """Keep Airflow's files out of ~/airflow; no example DAGs; S3 credentials for moto only."""
    os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="airflow-home-"))
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(key, None)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    return generate_synthetic(
        tmp_path_factory.mktemp("dataset"), SyntheticDataConfig(num_classes=4, images_per_class=10, min_test_images_per_class=0)
    )


@pytest.fixture
def settings(tmp_path, monkeypatch, tiny_dataset) -> Settings:
    """Settings as the pipeline reads them, from the environment, isolated under tmp_path."""
    for key, value in TINY_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("INSECT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("INSECT_DATASET_DIR", str(tiny_dataset))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A real PostgreSQL server, started the way the project starts its embedded one (in /tmp:
    pytest's own temp dirs are private to root, and as root the server runs as `postgres`), and
    migrated once."""
    cluster = Path(tempfile.mkdtemp(prefix="insect-pg-")) / "cluster"
    os.chmod(cluster.parent, 0o755)
    try:
        url = postgres.ensure_running(cluster, free_port())
        db.migrate(url)  # once, as a deploy does: the service's engines never migrate
        yield url
    finally:  # also when start-up failed half-way
        postgres.stop(cluster)
        shutil.rmtree(cluster.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A real S3 API over HTTP on localhost (moto's standalone server) that checks credentials as
    AWS does (moto's IAM authentication): only the keys of an IAM user created here get in, and
    this process's AWS_* variables (which the servers the tests start inherit) hold them."""
    from moto.core.authorization import enable_iam_authentication
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    iam = boto3.client("iam", endpoint_url=endpoint)
    iam.create_user(UserName="insect-tests")
    s3_only = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="insect-tests", PolicyName="s3", PolicyDocument=json.dumps(s3_only))
    key = iam.create_access_key(UserName="insect-tests")["AccessKey"]
    before = {name: os.environ[name] for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])
    boto3.setup_default_session()  # boto3's default session keeps the credentials it first resolved
    try:
        with enable_iam_authentication():
            yield endpoint
    finally:
        os.environ.update(before)
        boto3.setup_default_session()
        server.stop()


@pytest.fixture
def live_settings(settings, monkeypatch, postgres_url, s3_endpoint, request):
    """Settings on the real servers, with a bucket and a database schema of this test's own."""
    bucket = f"fb-{request.node.name.replace('_', '-')[:40].lower()}"
    monkeypatch.setattr(settings.feedback, "database_url", postgres_url)
    monkeypatch.setattr(settings.feedback, "s3_bucket", bucket)
    monkeypatch.setattr(settings.feedback, "s3_endpoint_url", s3_endpoint)
    monkeypatch.setattr(settings.feedback, "min_new_samples", 1)
    with db.engine(settings).begin() as conn:  # each test starts with no pending feedback
        conn.execute(db.feedback.delete())
    return settings


@pytest.fixture
def browser(tmp_path):
    """Debian's headless Chromium driven by its chromedriver (`make system-packages`)."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--window-size=1400,900",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(shutil.which("chromedriver") or "/usr/bin/chromedriver")
    )
    yield driver
    driver.quit()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    """A real Redis server on localhost (`make system-packages`), nothing saved to disk."""
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url
