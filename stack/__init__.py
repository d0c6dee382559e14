"""`make up`: the platform as real services on this machine, run by supervisord.

In start order, each health-checked before the next starts: PostgreSQL (Airflow's metadata,
MLflow's store and the feedback tables, each in its own database and role) -> an S3 API (moto's
server: MLflow artifacts and feedback images) -> the MLflow tracking server -> (CeleryExecutor:
Redis) -> Airflow's api-server, scheduler, dag-processor and triggerer -> (CeleryExecutor: the
workers) -> the Bento serving the champion.
Everything lives under `<data dir>/stack/`: the services' data, one log per service in `logs/`,
and `secrets.json`, generated on first start and readable only by its owner.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg2

from config import REPO_ROOT, Settings
from feedback import postgres
from stack import secrets as stack_secrets

BIN = Path(sys.executable).parent  # the project's virtual environment
# One PostgreSQL role and database per service, with the secret holding the role's password.
DATABASES = {"airflow": "airflow_db_password", "mlflow": "mlflow_db_password", postgres.DATABASE: "feedback_db_password"}
AIRFLOW_ADMIN = "admin"


class StackError(RuntimeError):
    """A service did not come up; the message names its log."""


@dataclass(frozen=True)
class Service:
    name: str
    command: list[str]
    healthy: Callable[[], bool]
    user: str | None = None  # the account it runs as (PostgreSQL refuses root)
    environment: dict[str, str] = field(default_factory=dict)  # on top of the stack's
    before_start: Callable[[], None] | None = None
    after_healthy: Callable[[], None] | None = None  # once per start: databases, buckets


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class Stack:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.dir = settings.stack_dir
        self.logs = self.dir / "logs"
        self.cluster = self.dir / "postgres"
        self.airflow_home = self.dir / "airflow"
        self.conf = self.dir / "supervisord.conf"
        self.socket = self.dir / "supervisor.sock"
        self.secrets = stack_secrets.load_or_create(self.dir / "secrets.json")

    # -- where everything is --------------------------------------------------------------------

    def url(self, service: str) -> str:
        ports = {
            "s3": self.settings.stack.s3_port,
            "mlflow": self.settings.stack.mlflow_port,
            "airflow": self.settings.stack.airflow_port,
            "bento": self.settings.serve.port,
        }
        return f"http://127.0.0.1:{ports[service]}"

    def database_url(self, database: str) -> str:
        password = self.secrets[DATABASES[database]]
        return f"postgresql+psycopg2://{database}:{password}@127.0.0.1:{self.settings.stack.postgres_port}/{database}"

    def environment(self) -> dict[str, str]:
        """What every service (and a DAG task) needs to find the others: supervisord hands its
        own environment to its programs, so it is started with this."""
        stack = self.settings.stack
        return {
            "INSECT_DATA_DIR": str(self.settings.data_dir),
            "INSECT_FEEDBACK__DATABASE_URL": self.database_url(postgres.DATABASE),
            "INSECT_FEEDBACK__S3_BUCKET": "feedback",
            "INSECT_FEEDBACK__S3_ENDPOINT_URL": self.url("s3"),
            "MLFLOW_TRACKING_URI": self.url("mlflow"),
            "MLFLOW_S3_ENDPOINT_URL": self.url("s3"),  # where the MLflow server keeps artifacts
            "AWS_ACCESS_KEY_ID": self.secrets["s3_access_key"],
            "AWS_SECRET_ACCESS_KEY": self.secrets["s3_secret_key"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "AIRFLOW_HOME": str(self.airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",  # the scheduler drives the loop
            "AIRFLOW__CORE__EXECUTOR": stack.executor,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url('airflow')}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{AIRFLOW_ADMIN}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.airflow_home / "passwords.json"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.database_url("airflow"),
            "AIRFLOW__API_AUTH__JWT_SECRET": self.secrets["airflow_jwt_secret"],
            "AIRFLOW__API__SECRET_KEY": self.secrets["airflow_api_secret_key"],
            "AIRFLOW__API__PORT": str(stack.airflow_port),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.logs / "airflow"),
            **(self._celery_environment() if self.celery else {}),
        }

    @property
    def celery(self) -> bool:
        return self.settings.stack.executor == "CeleryExecutor"

    def _celery_environment(self) -> dict[str, str]:
        return {
            "AIRFLOW__CELERY__BROKER_URL": self._broker_url,
            # task states go to Airflow's own database, as in Airflow's compose file
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + self.database_url("airflow").replace("+psycopg2", ""),
        }

    @property
    def _broker_url(self) -> str:
        return f"redis://127.0.0.1:{self.settings.stack.redis_port}/0"

    # -- the services ---------------------------------------------------------------------------

    def services(self) -> list[Service]:
        stack = self.settings.stack
        airflow = str(BIN / "airflow")
        return [
            Service(
                "postgres",
                [
                    _which("postgres"),
                    "-D",
                    str(self.cluster),
                    "-p",
                    str(stack.postgres_port),
                    "-k",
                    str(self.cluster),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "max_connections=200",
                ],
                self._postgres_healthy,
                user=postgres.SERVER_ACCOUNT if os.geteuid() == 0 else None,
                before_start=self._init_cluster,
                after_healthy=self._create_databases,
            ),
            Service(
                "s3",
                [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(stack.s3_port)],
                lambda: _http_ok(f"{self.url('s3')}/moto-api/data.json"),
                # moto keeps objects in memory: its recording of every write, replayed on start, persists them
                environment={"MOTO_ENABLE_RECORDING": "True", "MOTO_RECORDER_FILEPATH": str(self._s3_recording)},
                after_healthy=self._restore_buckets,
            ),
            Service(
                "mlflow",
                [
                    str(BIN / "mlflow"),
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(stack.mlflow_port),
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    self.database_url("mlflow"),
                    "--artifacts-destination",
                    "s3://mlflow",
                    "--serve-artifacts",
                ],
                lambda: _http_ok(f"{self.url('mlflow')}/health"),
            ),
            *([self._redis()] if self.celery else []),
            Service(
                "airflow-api-server",
                [airflow, "api-server", "--workers", "1"],
                lambda: _http_ok(f"{self.url('airflow')}/api/v2/monitor/health"),
                before_start=self._migrate_airflow,
            ),
            Service("airflow-scheduler", [airflow, "scheduler"], lambda: self._airflow_component_healthy("scheduler")),
            Service(
                "airflow-dag-processor", [airflow, "dag-processor"], lambda: self._airflow_component_healthy("dag_processor")
            ),
            Service("airflow-triggerer", [airflow, "triggerer"], lambda: self._airflow_component_healthy("triggerer")),
            *(self._celery_workers() if self.celery else []),
            Service(
                "bento",
                [str(BIN / "bentoml"), "serve", "bentos.service:InsectClassifier", "--port", str(self.settings.serve.port)],
                lambda: _http_ok(f"{self.url('bento')}/livez"),
            ),
        ]

    def _redis(self) -> Service:
        import redis

        data = self.dir / "redis"

        def healthy() -> bool:
            try:
                return redis.Redis(port=self.settings.stack.redis_port, socket_timeout=2).ping()
            except redis.RedisError:
                return False

        # append-only file: tasks queued when the stack stops are still queued after `make up`
        return Service(
            "redis",
            [
                _which("redis-server"),
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.settings.stack.redis_port),
                "--dir",
                str(data),
                "--appendonly",
                "yes",
                "--save",
                '""',
            ],
            healthy,
            before_start=lambda: data.mkdir(exist_ok=True),
        )

    def _celery_workers(self) -> list[Service]:
        """`airflow celery worker`s taking one task at a time, each answering Celery's ping."""
        from celery import Celery

        broker = Celery(broker=self._broker_url)

        def answers(name: str) -> bool:
            try:
                return bool(broker.control.ping(destination=[name], timeout=1))
            except OSError:
                return False

        workers = []
        for index in range(1, self.settings.stack.workers + 1):
            name = f"worker{index}@{socket.gethostname()}"
            workers.append(
                Service(
                    f"airflow-worker-{index}",
                    [str(BIN / "airflow"), "celery", "worker", "--concurrency", "1", "--celery-hostname", name],
                    lambda name=name: answers(name),
                    # each worker serves its task logs to the UI on a port of its own
                    environment={
                        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self.settings.stack.worker_log_port + index - 1)
                    },
                )
            )
        return workers

    @property
    def _s3_recording(self) -> Path:
        return self.dir / "s3" / "recording.jsonl"

    def _init_cluster(self) -> None:
        # The bootstrap superuser logs in over the cluster's own socket only; TCP logins need a password.
        postgres.init_cluster(self.cluster, "postgres", "--auth-local=trust", "--auth-host=scram-sha-256")

    def _admin_connection(self):
        return psycopg2.connect(
            host=str(self.cluster), port=self.settings.stack.postgres_port, user="postgres", dbname="postgres"
        )

    def _postgres_healthy(self) -> bool:
        try:
            self._admin_connection().close()
            return True
        except psycopg2.OperationalError:
            return False

    def _create_databases(self) -> None:
        conn = self._admin_connection()
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
        try:
            with conn.cursor() as cur:
                for name, secret in DATABASES.items():
                    cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
                    verb = "ALTER" if cur.fetchone() else "CREATE"
                    cur.execute(f"{verb} ROLE {name} LOGIN PASSWORD %s", (self.secrets[secret],))
                    postgres.create_database(cur, name, owner=name)
        finally:
            conn.close()

    def _restore_buckets(self) -> None:
        import boto3

        if self._s3_recording.exists():
            httpx.post(f"{self.url('s3')}/moto-api/recorder/replay-recording", timeout=600).raise_for_status()
        s3 = boto3.client(
            "s3",
            endpoint_url=self.url("s3"),
            aws_access_key_id=self.secrets["s3_access_key"],
            aws_secret_access_key=self.secrets["s3_secret_key"],
            region_name="us-east-1",
        )
        existing = {bucket["Name"] for bucket in s3.list_buckets()["Buckets"]}
        for bucket in {"mlflow", "feedback"} - existing:
            s3.create_bucket(Bucket=bucket)

    def _migrate_airflow(self) -> None:
        self.airflow_home.mkdir(parents=True, exist_ok=True)
        passwords = self.airflow_home / "passwords.json"
        fd = os.open(passwords, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({AIRFLOW_ADMIN: self.secrets["airflow_admin_password"]}, out)
        migrated = subprocess.run(
            [str(BIN / "airflow"), "db", "migrate"],
            env={**os.environ, **self.environment()},
            capture_output=True,
            text=True,
            check=False,
        )
        (self.logs / "airflow-db-migrate.log").write_text(migrated.stdout + migrated.stderr)
        if migrated.returncode != 0:
            raise StackError(f"airflow db migrate failed (log: {self.logs / 'airflow-db-migrate.log'})")

    def _airflow_component_healthy(self, component: str) -> bool:
        try:
            health = httpx.get(f"{self.url('airflow')}/api/v2/monitor/health", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return False
        return (health.get(component) or {}).get("status") == "healthy"

    # -- supervisord ----------------------------------------------------------------------------

    def _supervisor(self):
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def supervisor_running(self) -> bool:
        try:
            return self._supervisor().getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Fault):
            return False

    def write_supervisor_conf(self) -> None:
        sections = [
            (
                f"[supervisord]\nlogfile={self.logs / 'supervisord.log'}\npidfile={self.dir / 'supervisord.pid'}\n"
                f"childlogdir={self.logs}\ndirectory={REPO_ROOT}\n"
            ),
            f"[unix_http_server]\nfile={self.socket}\nchmod=0700\n",
            f"[supervisorctl]\nserverurl=unix://{self.socket}\n",
            "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n",
        ]
        for service in self.services():
            # PostgreSQL starts in its own cluster: its account may not be allowed into the checkout
            directory = self.cluster if service.name == "postgres" else REPO_ROOT
            lines = [
                f"[program:{service.name}]",
                f"command={' '.join(service.command)}",
                f"directory={directory}",
                "autostart=false",
                "autorestart=true",
                "startsecs=3",
                "stopasgroup=true",
                "killasgroup=true",
                "stopwaitsecs=30",
                "redirect_stderr=true",
                f"stdout_logfile={self.logs / service.name}.log",
            ]
            if service.user:
                lines.append(f"user={service.user}")
            if service.name == "postgres":
                lines.append("stopsignal=INT")  # PostgreSQL's fast shutdown
            if service.environment:
                lines.append("environment=" + ",".join(f'{k}="{v}"' for k, v in service.environment.items()))
            sections.append("\n".join(lines) + "\n")
        fd = os.open(self.conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("\n".join(sections))

    # -- up / down / status ---------------------------------------------------------------------

    def up(self, echo: Callable[[str], None] = print) -> None:
        """Start whatever is not running, in order, each healthy before the next; harmless twice."""
        for path in (self.logs, self._s3_recording.parent):
            path.mkdir(parents=True, exist_ok=True)
        if not self.supervisor_running():
            self.write_supervisor_conf()
            subprocess.run([str(BIN / "supervisord"), "-c", str(self.conf)], env={**os.environ, **self.environment()}, check=True)
            _wait(self.supervisor_running, 30, "supervisord", self.logs / "supervisord.log")
        supervisor = self._supervisor()
        for service in self.services():
            if supervisor.getProcessInfo(service.name)["statename"] == "RUNNING" and service.healthy():
                echo(f"{service.name:<22} already running")
                continue
            started = time.monotonic()
            if service.before_start:
                service.before_start()
            if supervisor.getProcessInfo(service.name)["statename"] != "RUNNING":
                supervisor.startProcess(service.name, True)
            self._wait_healthy(service)
            if service.after_healthy:
                service.after_healthy()
            echo(f"{service.name:<22} healthy in {time.monotonic() - started:5.1f} s")

    def _wait_healthy(self, service: Service) -> None:
        log = self.logs / f"{service.name}.log"

        def healthy() -> bool:
            state = self._supervisor().getProcessInfo(service.name)["statename"]
            if state in {"FATAL", "EXITED", "STOPPED"}:  # supervisord gave up restarting it
                raise StackError(f"{service.name} exited ({state}); see {log}")
            return service.healthy()

        _wait(healthy, self.settings.stack.start_timeout_s, service.name, log)

    def down(self) -> None:
        """Stop every service and supervisord; data stays."""
        if not self.supervisor_running():
            return
        pid = int((self.dir / "supervisord.pid").read_text())
        self._supervisor().shutdown()
        _wait(lambda: not _alive(pid), 120, "supervisord's shutdown", self.logs / "supervisord.log")

    def status(self) -> dict[str, str]:
        """Each service's process state, and whether its health check passes."""
        if not self.supervisor_running():
            return {service.name: "stopped" for service in self.services()}
        supervisor = self._supervisor()
        return {
            service.name: f"{supervisor.getProcessInfo(service.name)['statename'].lower()}"
            f"{', healthy' if service.healthy() else ''}"
            for service in self.services()
        }

    def logins(self) -> list[str]:
        return [
            f"Airflow UI   {self.url('airflow')}   user {AIRFLOW_ADMIN}, password {self.secrets['airflow_admin_password']}",
            f"MLflow UI    {self.url('mlflow')}",
            f"Bento API    {self.url('bento')}   (OpenAPI docs at /docs)",
            f"S3 API       {self.url('s3')}   keys in {self.dir / 'secrets.json'} (s3_access_key, s3_secret_key)",
            (
                f"PostgreSQL   127.0.0.1:{self.settings.stack.postgres_port}   databases {', '.join(DATABASES)}, "
                "one role each (passwords in secrets.json)"
            ),
        ]


def _which(program: str) -> str:
    found = shutil.which(program)
    if found is None:
        raise StackError(f"{program} is not on PATH (PostgreSQL's server binaries are needed)")
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _wait(condition: Callable[[], bool], timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise StackError(f"{what} not healthy after {timeout_s:.0f} s; see {log}")
        time.sleep(0.5)
