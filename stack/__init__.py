"""`make up`: the platform as real services on this machine, run by supervisord.

In start order, each health-checked before the next starts: PostgreSQL (Airflow's metadata,
MLflow's store and the feedback tables, each in its own database and role) -> S3 (rclone's S3
servers over files, one per set of rights: MLflow's artifacts, the Bento's photos, the tasks'
read-only view of them) -> Redis (the Bento's rate-limit
counts; Celery's broker) -> the MLflow tracking server -> Airflow's api-server, scheduler, dag-processor and triggerer ->
(CeleryExecutor: the workers) -> the Bento serving the champion.
Everything lives under `<data dir>/stack/`: the services' data, one log per service in `logs/`,
and `secrets.json`, generated on first start and readable only by its owner.

`layout` says where everything is, `services` what runs and how each is checked and set up,
`supervisor` drives supervisord; `Stack` puts them together.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import psutil

from config import Settings
from stack import secrets
from stack.errors import StackError
from stack.layout import AIRFLOW_ADMIN, DATABASES, STACK_MARKER, Layout
from stack.services import Service, services
from stack.supervisor import Supervisor

__all__ = ["DATABASES", "Service", "Stack", "StackError", "secrets"]


class Stack(Layout):
    """The stack's places (see `Layout`) and what `make up`, `make down` and `make status` do."""

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.supervisor = Supervisor(self)

    def services(self) -> list[Service]:
        return services(self)

    def up(self, echo: Callable[[str], None] = print) -> None:
        """Start whatever is not running, in order, each healthy before the next; harmless twice."""
        for path in (self.logs, self.s3_dir):
            path.mkdir(parents=True, exist_ok=True)
        in_order = self.services()
        if not self.supervisor.running():
            self.supervisor.start(in_order, {**self.environment(), STACK_MARKER: str(self.dir)})
        for service in in_order:
            if self.supervisor.state(service.name) == "RUNNING" and service.healthy():
                echo(f"{service.name:<22} already running")
                continue
            started = time.monotonic()
            self._start(service)
            echo(f"{service.name:<22} healthy in {time.monotonic() - started:5.1f} s")

    def _start(self, service: Service) -> None:
        if service.before_start:
            service.before_start()
        if self.supervisor.state(service.name) != "RUNNING":  # supervisord may be restarting it already
            self.supervisor.start_service(service.name)
        self.supervisor.wait_healthy(service, self.settings.stack.start_timeout_s)
        if service.after_healthy:
            service.after_healthy()

    def running_services(self) -> list[str]:
        if not self.supervisor.running():
            return []
        return [service.name for service in self.services() if self.supervisor.state(service.name) == "RUNNING"]

    def down(self) -> None:
        """Stop every service and supervisord, then any process they left behind (the Bento's
        workers run in process groups of their own); data stays. Fails if a port stays taken."""
        if self.supervisor.running():
            self.supervisor.shutdown()
        left = self.processes()
        for process in left:
            process.terminate()
        _, alive = psutil.wait_procs(left, timeout=15)
        for process in alive:
            process.kill()
        taken = [port for port in self.ports() if _listening(port)]
        if taken:
            raise StackError(f"stopped the stack, but ports {taken} on 127.0.0.1 are still taken by another program")

    def processes(self) -> list[psutil.Process]:
        """Every live process the stack started: they inherit the marker supervisord starts with."""
        found = []
        for process in psutil.process_iter():
            try:
                if process.pid != os.getpid() and process.environ().get(STACK_MARKER) == str(self.dir):
                    found.append(process)
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                pass
        return found

    def status(self) -> dict[str, str]:
        """Each service's process state, whether its health check passes, and what it serves."""
        if not self.supervisor.running():
            return {service.name: "stopped" for service in self.services()}
        return {service.name: self._status(service) for service in self.services()}

    def _status(self, service: Service) -> str:
        state = self.supervisor.state(service.name).lower()
        healthy = service.healthy()
        if not healthy:  # one slow answer is not an outage: look again before saying so
            time.sleep(1)
            healthy = service.healthy()
        if not healthy:
            return state
        return f"{state}, healthy" + (f", {service.describe()}" if service.describe else "")

    def logins(self) -> list[str]:
        return [
            f"Airflow UI   {self.url('airflow')}   user {AIRFLOW_ADMIN}",
            f"             password in {self.secrets_file} (airflow_admin_password)",
            f"MLflow UI    {self.url('mlflow')}   user reviewer (reads, promotes) or admin",
            f"             passwords in {self.secrets_file} (mlflow_reviewer_password, mlflow_admin_password)",
            f"Bento API    {self.url('bento')}   Swagger UI at /, the OpenAPI document at /docs.json",
            f"Web app      {self.url('bento')}/app/   sign in with a key",
            f"             API keys in {self.keys}: client.key, labeler.key, admin.key",
            f"S3 API       {self.url('s3-mlflow')} (MLflow's), {self.url('s3-feedback')} (the Bento's photos), "
            f"{self.url('s3-feedback-read')} (read-only, the tasks'); secret keys in {self.secrets_file}",
            (
                f"PostgreSQL   127.0.0.1:{self.settings.stack.postgres_port}   databases {', '.join(DATABASES)}, "
                "one role each (passwords in secrets.json)"
            ),
        ]


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0
