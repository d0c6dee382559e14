"""The services `make up` runs, in start order, each with the health check that says it is up and
the set-up it needs before it starts or once it answers."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import psycopg2

from config import REPO_ROOT
from config.private import write_private
from feedback import postgres
from registry import signing
from registry.logins import LoginsError, auth_config, create_logins
from stack.errors import StackError
from stack.layout import AIRFLOW_ADMIN, DATABASES, FEEDBACK_ROLES, MLFLOW_BUCKET, MLFLOW_USERS, Layout, S3Server

BIN = Path(sys.executable).parent  # the project's virtual environment
# Airflow's log servers listen on every interface, with no setting to bind them to 127.0.0.1. On
# one machine they are not needed: the API server reads task logs from the shared log folder.
NO_LOG_SERVER = ("--skip-serve-logs",)


@dataclass(frozen=True)
class Service:
    name: str
    command: list[str]
    healthy: Callable[[], bool]
    user: str | None = None  # the account it runs as (PostgreSQL refuses root)
    environment: dict[str, str] = field(default_factory=dict)  # on top of the stack's
    directory: Path = REPO_ROOT  # where it runs
    stop_signal: str | None = None  # supervisord's default: TERM
    before_start: Callable[[], None] | None = None
    after_healthy: Callable[[], None] | None = None  # once per start: databases, buckets
    describe: Callable[[], str] | None = None  # what a healthy one serves, for `make status`


def services(layout: Layout) -> list[Service]:
    """Each healthy before the next starts: storage, then MLflow, then Airflow, then the Bento."""
    return [
        _postgres(layout),
        *_s3(layout),
        _redis(layout),
        _mlflow(layout),
        *_airflow(layout),
        *(_celery_workers(layout) if layout.celery else []),
        _bento(layout),
    ]


# -- storage: PostgreSQL and S3 -------------------------------------------------------------------


def _postgres(layout: Layout) -> Service:
    return Service(
        "postgres",
        [
            _which("postgres"),
            *("-D", str(layout.cluster), "-p", str(layout.settings.stack.postgres_port), "-k", str(layout.cluster)),
            *("-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"),
        ],
        partial(_postgres_healthy, layout),
        user=postgres.SERVER_ACCOUNT if os.geteuid() == 0 else None,
        directory=layout.cluster,  # its account may not be allowed into the checkout
        stop_signal="INT",  # PostgreSQL's fast shutdown
        before_start=partial(_init_cluster, layout),
        after_healthy=partial(_create_databases, layout),
    )


def _init_cluster(layout: Layout) -> None:
    # The bootstrap superuser logs in over the cluster's own socket only; TCP logins need a password.
    postgres.init_cluster(layout.cluster, "postgres", *postgres.AUTH)


def _admin_connection(layout: Layout):
    return psycopg2.connect(
        host=str(layout.cluster), port=layout.settings.stack.postgres_port, user="postgres", dbname="postgres"
    )


def _postgres_healthy(layout: Layout) -> bool:
    try:
        _admin_connection(layout).close()
        return True
    except psycopg2.OperationalError:
        return False


def _create_databases(layout: Layout) -> None:
    """A role and a database per service, and the feedback database's other logins (the Bento's,
    the key administrator's); a role that exists gets its password again. Then the feedback
    database's schema, migrated (and granted) here once per start by its owner, before Airflow's
    tasks or the Bento use it (the Bento's workers never migrate)."""
    conn = _admin_connection(layout)
    conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
    try:
        with conn.cursor() as cur:
            for name, secret in DATABASES.items():
                postgres.create_role(cur, name, layout.secrets[secret])
                postgres.create_database(cur, name, owner=name)
            for role, secret in FEEDBACK_ROLES.items():
                postgres.create_role(cur, role, layout.secrets[secret])
    finally:
        conn.close()
    from feedback import db  # Alembic and SQLAlchemy: only once the stack starts PostgreSQL

    db.migrate(layout.database_url(postgres.DATABASE))


def _s3(layout: Layout) -> list[Service]:
    """An S3 server per set of rights (`Layout.s3_servers`), each over its folder of `s3_dir`."""
    return [
        Service(
            name,
            server.command(layout.s3_dir, layout.secrets_file),
            partial(_bucket_readable, layout, name),
            before_start=partial(_create_bucket, layout.s3_dir, server),
        )
        for name, server in layout.s3_servers().items()
    ]


def _create_bucket(root: Path, server: S3Server) -> None:
    """A bucket is a directory of rclone's, and a server's folder (its bucket, or a prefix of it)
    one it cannot make: made before it starts, only its owner may read them."""
    (root / server.bucket).mkdir(mode=0o700, parents=True, exist_ok=True)
    server.folder(root).mkdir(parents=True, exist_ok=True)  # a prefix: inside the bucket's private directory


def _bucket_readable(layout: Layout, name: str) -> bool:
    """A signed request the stack depends on, and a cheap one: HEAD of the server's bucket, with
    the key pair of the one user it lets in."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    server = layout.s3_servers()[name]
    login = layout.s3_login(server.user)
    s3 = boto3.client(
        "s3",
        endpoint_url=layout.url(name),
        aws_access_key_id=login["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=login["AWS_SECRET_ACCESS_KEY"],
        region_name=login["AWS_DEFAULT_REGION"],
        config=Config(connect_timeout=2, read_timeout=2, retries={"max_attempts": 1}),
    )
    try:
        s3.head_bucket(Bucket=server.bucket)
        return True
    except (BotoCoreError, ClientError):
        return False


# -- MLflow ----------------------------------------------------------------------------------------


def _mlflow(layout: Layout) -> Service:
    """The tracking server and registry behind MLflow's basic-auth app: nothing without a login."""
    return Service(
        "mlflow",
        [
            *(str(BIN / "mlflow"), "server", "--app-name", "basic-auth"),
            *("--host", "127.0.0.1", "--port", str(layout.settings.stack.mlflow_port), "--workers", "1"),
            # the only S3 client of its bucket: everyone else gets artifacts through it, with a login
            *("--artifacts-destination", f"s3://{MLFLOW_BUCKET}", "--serve-artifacts"),
        ],
        partial(_http_ok, f"{layout.url('mlflow')}/health"),  # the one route open without a login
        # secrets in the environment (read by `mlflow server`), not argv
        environment={
            "MLFLOW_BACKEND_STORE_URI": layout.database_url("mlflow"),
            "MLFLOW_AUTH_CONFIG_PATH": str(layout.mlflow_auth_config),
            "MLFLOW_AUTH_ADMIN_PASSWORD": layout.secrets["mlflow_admin_password"],  # used once, to create the admin
            "MLFLOW_FLASK_SERVER_SECRET_KEY": layout.secrets["mlflow_flask_secret_key"],
            "MLFLOW_S3_ENDPOINT_URL": layout.url("s3-mlflow"),  # its artifacts, through the one server letting it in
            **layout.s3_login("mlflow"),
        },
        before_start=partial(_write_mlflow_auth_config, layout),
        after_healthy=partial(_set_up_registry, layout),
    )


def _write_mlflow_auth_config(layout: Layout) -> None:
    """basic-auth's settings: a login reads everything by default; users in SQLite beside it."""
    layout.mlflow_auth_config.parent.mkdir(mode=0o700, exist_ok=True)
    store = layout.mlflow_auth_config.with_name("basic_auth.db")
    write_private(layout.mlflow_auth_config, auth_config(f"sqlite:///{store}"))


def _set_up_registry(layout: Layout) -> None:
    """Before Airflow or the Bento start: the logins, the experiment and model owned by
    `airflow`, and the key the training tasks sign model versions with."""
    settings = layout.settings
    signing.create_key(settings.signing_key_file, settings.trusted_keys_file)
    passwords = {user: layout.secrets[secret] for user, secret in MLFLOW_USERS.items()}
    admin_password = layout.secrets["mlflow_admin_password"]
    try:
        names = settings.experiment_name, settings.registered_model_name
        create_logins(layout.url("mlflow"), admin_password, passwords, *names)
    except LoginsError as error:
        raise StackError(str(error)) from error


# -- Airflow, and with CeleryExecutor its broker and workers ---------------------------------------


def _airflow(layout: Layout) -> list[Service]:
    """Only what runs tasks holds the tasks' secrets (the feedback storage, MLflow's `airflow`
    login, which may promote): the scheduler with LocalExecutor, whose tasks are its subprocesses,
    and Celery's workers. The DAG processor parses DAG files, which open no connection (tests/code/
    test_dags.py); it and the triggerer reach Airflow's API in process, with no token to check."""
    airflow = str(BIN / "airflow")
    return [
        Service(
            "airflow-api-server",
            [airflow, "api-server", "--workers", "1"],
            partial(_http_ok, f"{layout.url('airflow')}/api/v2/monitor/health"),
            before_start=partial(_migrate_airflow, layout),
            environment=layout.airflow_secrets(broker=False, tasks=False),  # checks tokens, serves the UI
        ),
        Service(
            "airflow-scheduler",
            [airflow, "scheduler", *NO_LOG_SERVER],
            partial(_airflow_component_healthy, layout, "scheduler"),
            # signs the tasks' tokens; LocalExecutor's tasks run under it, Celery's on the workers
            environment=layout.airflow_secrets(api_key=False, tasks=not layout.celery),
        ),
        Service(
            "airflow-dag-processor",
            [airflow, "dag-processor"],
            partial(_airflow_component_healthy, layout, "dag_processor"),
            environment=layout.airflow_database(),
        ),
        Service(
            "airflow-triggerer",
            [airflow, "triggerer", *NO_LOG_SERVER],
            partial(_airflow_component_healthy, layout, "triggerer"),
            environment=layout.airflow_database(),
        ),
    ]


def _migrate_airflow(layout: Layout) -> None:
    """The admin's login, then Airflow's database schema, before the API server first reads them."""
    write_private(layout.airflow_passwords, json.dumps({AIRFLOW_ADMIN: layout.secrets["airflow_admin_password"]}))
    migrated = subprocess.run(
        [str(BIN / "airflow"), "db", "migrate"],
        env={**os.environ, **layout.environment(), **layout.airflow_database()},
        capture_output=True,
        text=True,
        check=False,
    )
    log = layout.logs / "airflow-db-migrate.log"
    log.write_text(migrated.stdout + migrated.stderr)
    if migrated.returncode != 0:
        raise StackError(f"airflow db migrate failed (log: {log})")


def _airflow_component_healthy(layout: Layout, component: str) -> bool:
    """The API server's view of a component that serves no HTTP of its own (its heartbeat)."""
    try:
        health = httpx.get(f"{layout.url('airflow')}/api/v2/monitor/health", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return False
    return (health.get(component) or {}).get("status") == "healthy"


def _redis(layout: Layout) -> Service:
    """Celery's broker and the rate-limit counts the Bento's workers share. Its password is in
    a config file only the stack's owner reads, not in its command line."""
    data = layout.dir / "redis"
    config = data / "redis.conf"
    settings = {
        "bind": "127.0.0.1",
        "port": layout.settings.stack.redis_port,
        "dir": data,
        "requirepass": layout.secrets["redis_password"],
        "appendonly": "yes",  # tasks queued when the stack stops are still queued after `make up`
        "save": '""',
    }

    def write_config() -> None:
        data.mkdir(exist_ok=True)
        write_private(config, "".join(f"{name} {value}\n" for name, value in settings.items()))

    return Service(
        "redis", [_which("redis-server"), str(config)], partial(_redis_healthy, layout.redis_url(0)), before_start=write_config
    )


def _redis_healthy(url: str) -> bool:
    import redis

    try:
        return redis.Redis.from_url(url, socket_timeout=2).ping()
    except redis.RedisError:
        return False


def _celery_workers(layout: Layout) -> list[Service]:
    """`airflow celery worker`s taking one task at a time, each answering Celery's ping."""
    from celery import Celery

    broker = Celery(broker=layout.redis_url(0))
    workers = []
    for index in range(1, layout.settings.stack.workers + 1):
        name = f"worker{index}@{socket.gethostname()}"
        workers.append(
            Service(
                f"airflow-worker-{index}",
                [str(BIN / "airflow"), "celery", "worker", "--concurrency", "1", "--celery-hostname", name, *NO_LOG_SERVER],
                partial(_worker_answers, broker, name),
                # runs tasks with the tokens it is handed: no JWT secret, no API key
                environment=layout.airflow_secrets(jwt=False, api_key=False),
            )
        )
    return workers


def _worker_answers(broker, name: str) -> bool:
    try:
        return bool(broker.control.ping(destination=[name], timeout=1))
    except OSError:
        return False


# -- the Bento -------------------------------------------------------------------------------------


def _bento(layout: Layout) -> Service:
    port = layout.settings.serve.port
    return Service(
        "bento",
        [str(BIN / "bentoml"), "serve", "bentos.service:InsectClassifier", "--port", str(port)],
        partial(_http_ok, f"{layout.url('bento')}/livez"),
        before_start=partial(_create_api_keys, layout),
        describe=partial(_served_model, layout),
        # the web app's models page links to the UIs of this stack
        environment={
            "INSECT_SERVE__MLFLOW_UI_URL": layout.url("mlflow"),
            "INSECT_SERVE__AIRFLOW_UI_URL": layout.url("airflow"),
            # the workers count each key's requests together
            "INSECT_SERVE__WORKERS": str(layout.settings.stack.bento_workers),
            "INSECT_SERVE__RATE_LIMIT_STORE": layout.redis_url(1),
            **layout.storage_secrets("bento"),  # its photos only: no key to MLflow's bucket
            # its own login: rows, no DDL, the API keys read-only (feedback.db.ROLE_GRANTS)
            "INSECT_FEEDBACK__DATABASE_URL": layout.feedback_url(postgres.SERVICE_ROLE),
            **layout.mlflow_login("bento"),  # reads the registry, moves no alias
        },
    )


def _served_model(layout: Layout) -> str:
    """Live is not ready: the Bento answers before a champion exists, and /readyz says which."""
    try:
        if httpx.get(f"{layout.url('bento')}/readyz", timeout=2).status_code != 200:
            return "up, no champion yet"
        key = (layout.keys / "client.key").read_text().strip()
        served = httpx.post(f"{layout.url('bento')}/model", headers={"Authorization": f"Bearer {key}"}, timeout=5).json()
    except (httpx.HTTPError, OSError, ValueError) as error:
        return f"up, not answering what it serves ({type(error).__name__})"
    return f"ready, serving {served['name']} v{served['version']} ({served['backend']})"


def _create_api_keys(layout: Layout) -> None:
    """A key per role for the people trying the stack (the web app signs in with them), in files
    only its owner reads."""
    from feedback import db, keys

    engine = db.engine_for(layout.feedback_url(postgres.KEYS_ROLE))
    for role in keys.ROLES:
        keys.key_in_file(engine, layout.keys / f"{role}.key", name=f"stack-{role}", role=role)


# -- helpers ---------------------------------------------------------------------------------------


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _which(program: str) -> str:
    found = postgres.server_program(program) if program == "postgres" else shutil.which(program)
    if found is None:
        raise StackError(
            f"{program} is not on PATH: install PostgreSQL's server binaries and redis-server (`make system-packages`)"
        )
    return found
