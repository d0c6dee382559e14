"""Where everything in the stack is: its directories and secrets, each service's address, and the
environment every service starts with. Nothing here starts or touches a service."""

from __future__ import annotations

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
BUCKETS = ("mlflow", "feedback")  # the S3 service's: MLflow's artifacts, the users' photos
# MLflow's logins besides its admin (registry.logins says who may do what), with the secret
# holding each password.
MLFLOW_USERS = {user: f"mlflow_{user}_password" for user in logins.USERS}


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
        self.s3_dir = self.dir / "s3"  # a directory per bucket, a file per object
        self.secrets_file = self.dir / "secrets.json"
        self.mlflow_auth_config = self.dir / "mlflow" / "basic_auth.ini"  # its user store lives next to it
        self.secrets = stack_secrets.load_or_create(self.secrets_file)

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

    def feedback_url(self, role: str) -> str:
        """The feedback database, logged in as one of `FEEDBACK_ROLES`."""
        password = self.secrets[FEEDBACK_ROLES[role]]
        return f"postgresql+psycopg2://{role}:{password}@127.0.0.1:{self.settings.stack.postgres_port}/{postgres.DATABASE}"

    def ports(self) -> list[int]:
        """Every 127.0.0.1 port a service of the stack listens on."""
        stack = self.settings.stack
        return [
            stack.postgres_port,
            stack.s3_port,
            stack.redis_port,
            stack.mlflow_port,
            stack.airflow_port,
            self.settings.serve.port,
        ]

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
        """Where the services are, and the keys to the storage: for a user's shell."""
        return {**self._whereabouts(), **self.storage_secrets()}

    def _whereabouts(self) -> dict[str, str]:
        return {
            "INSECT_DATA_DIR": str(self.settings.data_dir),
            "INSECT_FEEDBACK__S3_BUCKET": "feedback",
            "INSECT_FEEDBACK__S3_ENDPOINT_URL": self.url("s3"),
            "MLFLOW_TRACKING_URI": self.url("mlflow"),  # the server, not the settings' local store
            "MLFLOW_S3_ENDPOINT_URL": self.url("s3"),  # where the MLflow server keeps artifacts
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def s3_keys(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.secrets["s3_access_key"], "AWS_SECRET_ACCESS_KEY": self.secrets["s3_secret_key"]}

    def storage_secrets(self) -> dict[str, str]:
        """The feedback database and the S3 keys: for the Bento and the DAGs' tasks."""
        return {"INSECT_FEEDBACK__DATABASE_URL": self.database_url(postgres.DATABASE), **self.s3_keys()}

    def airflow_secrets(self, *, tokens: bool = True) -> dict[str, str]:
        """What an Airflow component needs: its database, with CeleryExecutor the broker, and (for
        tasks) storage and the MLflow login `airflow`; with `tokens` the JWT secret and the API
        server's key, which a Celery worker, running tasks with the tokens it is handed, has no use for."""
        secrets = {
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.database_url("airflow"),
            **(self._celery_environment() if self.celery else {}),
            **self.storage_secrets(),
            **self.mlflow_login("airflow"),
        }
        if tokens:
            secrets["AIRFLOW__API_AUTH__JWT_SECRET"] = self.secrets["airflow_jwt_secret"]
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
