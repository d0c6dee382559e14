"""Where everything in the stack is: its directories and secrets, each service's address, and the
environment every service starts with. Nothing here starts or touches a service."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from config import Settings
from config.airflow import airflow_environment
from feedback import postgres
from registry import logins
from stack import secrets as stack_secrets

# One PostgreSQL role and database per service, with the secret holding the role's password.
DATABASES = {"airflow": "airflow_db_password", "mlflow": "mlflow_db_password", postgres.DATABASE: "feedback_db_password"}
# The feedback database's logins besides its owner, with the secret holding each password.
FEEDBACK_ROLES = {postgres.SERVICE_ROLE: "feedback_service_db_password", postgres.KEYS_ROLE: "feedback_keys_db_password"}
AIRFLOW_ADMIN = "admin"
# Set in every process the stack starts (to this stack's directory): `make down` finds stragglers by it.
STACK_MARKER = "MAKE_UP_STACK_DIR"
MLFLOW_BUCKET, FEEDBACK_BUCKET = "mlflow", "feedback"  # MLflow's artifacts, the users' photos
# MLflow's logins besides its admin (registry.logins says who may do what), with the secret
# holding each password.
MLFLOW_USERS = {user: f"mlflow_{user}_password" for user in logins.USERS}


@dataclass(frozen=True)
class S3Server:
    """One of rclone's S3 servers (stack/s3.py): one bucket, or one prefix of it, for one S3 user."""

    port: int
    bucket: str
    user: str  # one of secrets.S3_USERS: the only key pair it lets in
    prefix: str = ""  # only this folder of the bucket is served: nothing outside it can be read or written
    read_only: bool = False

    def command(self, root: Path, secrets_file: Path) -> list[str]:
        """How supervisord starts it: names and paths, no secret."""
        options = [*(("--prefix", self.prefix) if self.prefix else ()), *(("--read-only",) if self.read_only else ())]
        return [sys.executable, "-m", "stack.s3", str(self.port), str(root), self.bucket, self.user, str(secrets_file), *options]

    @property
    def segments(self) -> list[str]:
        return [self.bucket, *(part for part in self.prefix.split("/") if part)]

    def folder(self, root: Path) -> Path:
        """The directory it serves: a folder the server cannot make, so made before it starts."""
        return root.joinpath(*self.segments)


class Layout:
    """Everything under `<data dir>/stack/`, and the 127.0.0.1 ports the settings give each service."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.dir = settings.stack_dir
        self.logs = self.dir / "logs"
        self.cluster = self.dir / "postgres"
        self.airflow_home = self.dir / "airflow"
        self.keys = self.dir / "keys"  # the service's API keys, one file each (mode 0600)
        self.airflow_passwords = self.airflow_home / "passwords.json"  # the simple auth manager's admin login
        self.conf = self.dir / "supervisord.conf"
        self.socket = self.dir / "supervisor.sock"
        self.pid_file = self.dir / "supervisord.pid"
        self.s3_dir = self.dir / "s3"  # a directory per bucket, a file per object, whichever server serves it
        self.secrets_file = self.dir / "secrets.json"
        self.mlflow_auth_config = self.dir / "mlflow" / "basic_auth.ini"  # its user store lives next to it
        self.secrets = stack_secrets.load_or_create(self.secrets_file)

    def url(self, service: str) -> str:
        ports = {
            "s3": self.settings.stack.s3_port,  # the first S3 server, MLflow's (`s3-mlflow`)
            **{name: server.port for name, server in self.s3_servers().items()},
            "mlflow": self.settings.stack.mlflow_port,
            "airflow": self.settings.stack.airflow_port,
            "bento": self.settings.serve.port,
        }
        return f"http://127.0.0.1:{ports[service]}"

    def database_url(self, database: str) -> str:
        password = self.secrets[DATABASES[database]]
        return f"postgresql+psycopg2://{database}:{password}@127.0.0.1:{self.settings.stack.postgres_port}/{database}"

    def feedback_url(self, role: str) -> str:
        """The feedback database, logged in as one of `FEEDBACK_ROLES`."""
        password = self.secrets[FEEDBACK_ROLES[role]]
        return f"postgresql+psycopg2://{role}:{password}@127.0.0.1:{self.settings.stack.postgres_port}/{postgres.DATABASE}"

    def ports(self) -> list[int]:
        """Every 127.0.0.1 port a service of the stack listens on."""
        stack = self.settings.stack
        return [
            stack.postgres_port,
            *(server.port for server in self.s3_servers().values()),
            stack.redis_port,
            stack.mlflow_port,
            stack.airflow_port,
            self.settings.serve.port,
        ]

    def s3_servers(self) -> dict[str, S3Server]:
        """rclone's S3 servers by service name, each letting in one S3 user: rclone gives every
        key pair it accepts the same rights, so each set of rights is a server of its own."""
        stack = self.settings.stack
        return {
            # MLflow's artifacts: its server is their only S3 client; the tasks, the Bento and people
            # reach them through it (--serve-artifacts, mlflow-artifacts:/ URIs) with their MLflow login
            "s3-mlflow": S3Server(stack.s3_port, MLFLOW_BUCKET, "mlflow"),
            # the users' photos: the Bento stores and reads them under its prefix, and nothing else
            "s3-feedback": S3Server(stack.s3_feedback_port, FEEDBACK_BUCKET, "bento", prefix=self.settings.feedback.s3_prefix),
            # the same photos, read-only: the tasks export them into dataset versions and watch drift
            "s3-feedback-read": S3Server(stack.s3_feedback_read_port, FEEDBACK_BUCKET, "airflow", read_only=True),
        }

    @property
    def celery(self) -> bool:
        return self.settings.stack.executor == "CeleryExecutor"

    def mlflow_login(self, user: str) -> dict[str, str]:
        """What an MLflow client reads to log in as `user`."""
        return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": self.secrets[MLFLOW_USERS[user]]}

    def redis_url(self, database: int) -> str:
        """Database 0: Celery's broker; 1: the Bento's rate-limit counts."""
        return f"redis://:{self.secrets['redis_password']}@127.0.0.1:{self.settings.stack.redis_port}/{database}"

    def environment(self) -> dict[str, str]:
        """Where everything is, and no secret: supervisord hands its own environment to every
        program, so it is started with this; each service adds only the secrets it uses."""
        return {
            **airflow_environment(self.settings, airflow_home=self.airflow_home),
            **self._whereabouts(),
            **self._airflow_services(),
        }

    def addresses(self) -> dict[str, str]:
        """Where the services are, and no secret: for a person's shell."""
        return self._whereabouts()

    def _whereabouts(self) -> dict[str, str]:
        return {
            "INSECT_DATA_DIR": str(self.settings.data_dir),
            "MLFLOW_TRACKING_URI": self.url("mlflow"),  # the server, not the settings' local store; artifacts too
        }

    def s3_login(self, user: str) -> dict[str, str]:
        """What an S3 client reads to sign in as `user` (`secrets.S3_USERS`)."""
        access_key, secret = stack_secrets.S3_USERS[user]
        return {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": self.secrets[secret], "AWS_DEFAULT_REGION": "us-east-1"}

    def storage_secrets(self, user: str) -> dict[str, str]:
        """The feedback database, and the feedback bucket through the S3 server that lets `user`
        in: "bento" (its photos, read and written) or "airflow" (the DAGs' tasks: read-only)."""
        [name] = [name for name, server in self.s3_servers().items() if server.bucket == FEEDBACK_BUCKET and server.user == user]
        return {
            "INSECT_FEEDBACK__DATABASE_URL": self.database_url(postgres.DATABASE),
            "INSECT_FEEDBACK__S3_BUCKET": FEEDBACK_BUCKET,
            "INSECT_FEEDBACK__S3_ENDPOINT_URL": self.url(name),
            **self.s3_login(user),
        }

    def airflow_database(self) -> dict[str, str]:
        """All that Airflow's DAG processor and triggerer hold: they reach Airflow's API in process."""
        return {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.database_url("airflow")}

    def airflow_secrets(
        self, *, jwt: bool = True, api_key: bool = True, broker: bool = True, tasks: bool = True
    ) -> dict[str, str]:
        """What an Airflow component may hold, all of it by default: each of Airflow's services
        asks only for its own (`stack.services`). Always Airflow's database; `broker`: with
        CeleryExecutor, its broker and result store (the scheduler queues tasks, workers take
        them); `jwt`: the secret that signs (the scheduler) and checks (the API server) the tasks'
        tokens; `api_key`: the API server's own; `tasks`: what the DAGs' tasks use, the feedback
        storage and MLflow's `airflow` login (it may promote), for the processes that run tasks."""
        secrets = self.airflow_database()
        if broker and self.celery:
            secrets |= self._celery_environment()
        if tasks:
            secrets |= self.storage_secrets("airflow") | self.mlflow_login("airflow")
        if jwt:
            secrets["AIRFLOW__API_AUTH__JWT_SECRET"] = self.secrets["airflow_jwt_secret"]
        if api_key:
            secrets["AIRFLOW__API__SECRET_KEY"] = self.secrets["airflow_api_secret_key"]
        return secrets

    def _airflow_services(self) -> dict[str, str]:
        """Airflow as separate services sharing one PostgreSQL database and one login."""
        return {
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",  # the scheduler drives the loop
            "AIRFLOW__CORE__EXECUTOR": self.settings.stack.executor,
            "AIRFLOW__CORE__PARALLELISM": str(self.settings.stack.parallelism),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url('airflow')}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{AIRFLOW_ADMIN}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.airflow_passwords),
            "AIRFLOW__API__HOST": "127.0.0.1",  # Airflow's default is every interface
            "AIRFLOW__API__PORT": str(self.settings.stack.airflow_port),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.logs / "airflow"),
        }

    def _celery_environment(self) -> dict[str, str]:
        return {
            "AIRFLOW__CELERY__BROKER_URL": self.redis_url(0),
            # task states go to Airflow's own database, as in Airflow's compose file
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + self.database_url("airflow").replace("+psycopg2", ""),
        }
