"""supervisord, which runs the stack's services: its configuration, and its XML-RPC API over a
Unix socket only the stack's owner can open."""

from __future__ import annotations

import os
import subprocess
import time
import xmlrpc.client
from collections.abc import Callable, Iterable
from pathlib import Path

from config import REPO_ROOT
from config.private import write_private
from stack.errors import StackError
from stack.layout import Layout
from stack.services import BIN, Service

# supervisord has given up restarting a program in these states
GAVE_UP = {"FATAL", "EXITED", "STOPPED"}


class Supervisor:
    def __init__(self, layout: Layout):
        self.layout = layout
        self.log = layout.logs / "supervisord.log"

    def running(self) -> bool:
        try:
            return self._rpc().getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Fault):
            return False

    def start(self, services: Iterable[Service], environment: dict[str, str]) -> None:
        """supervisord itself, with every service configured but none started: its programs
        inherit its environment, so it gets the stack's."""
        self.write_conf(services)
        subprocess.run(
            [str(BIN / "supervisord"), "-c", str(self.layout.conf)], env={**_without_credentials(), **environment}, check=True
        )
        wait_until(self.running, 30, "supervisord", self.log)

    def write_conf(self, services: Iterable[Service]) -> None:
        sections = [*self._supervisord_sections(), *(_program_section(service, self.layout.logs) for service in services)]
        write_private(self.layout.conf, "\n".join(sections))  # 0600: the services' environments hold passwords

    def _supervisord_sections(self) -> list[str]:
        layout = self.layout
        return [
            f"[supervisord]\nlogfile={self.log}\npidfile={layout.pid_file}\nchildlogdir={layout.logs}\ndirectory={REPO_ROOT}\n",
            f"[unix_http_server]\nfile={layout.socket}\nchmod=0700\n",  # the socket: only its owner drives supervisord
            f"[supervisorctl]\nserverurl=unix://{layout.socket}\n",
            "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n",
        ]

    def state(self, service: str) -> str:
        """supervisord's state of its program: RUNNING, STARTING, BACKOFF, FATAL, ..."""
        return self._rpc().getProcessInfo(service)["statename"]

    def start_service(self, service: str) -> None:
        self._rpc().startProcess(service, True)

    def wait_healthy(self, service: Service, timeout_s: float) -> None:
        """Until its health check passes; fails at once if supervisord gave up on it."""
        log = self.layout.logs / f"{service.name}.log"

        def healthy() -> bool:
            state = self.state(service.name)
            if state in GAVE_UP:
                raise StackError(f"{service.name} exited ({state}); see {log}")
            return service.healthy()

        wait_until(healthy, timeout_s, service.name, log)

    def shutdown(self) -> None:
        """Stop every service, then supervisord; returns once its process is gone."""
        pid = int(self.layout.pid_file.read_text())
        self._rpc().shutdown()
        wait_until(lambda: not _alive(pid), 120, "supervisord's shutdown", self.log)

    def _rpc(self):
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.layout.socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor


def _program_section(service: Service, logs: Path) -> str:
    lines = [
        f"[program:{service.name}]",
        f"command={' '.join(service.command)}",
        f"directory={service.directory}",
        "autostart=false",  # `make up` starts each in order, once the one before it is healthy
        "autorestart=true",
        "startsecs=3",
        "stopasgroup=true",
        "killasgroup=true",
        "stopwaitsecs=30",
        "redirect_stderr=true",
        f"stdout_logfile={logs / service.name}.log",
    ]
    if service.user:
        lines.append(f"user={service.user}")
    if service.stop_signal:
        lines.append(f"stopsignal={service.stop_signal}")
    if service.environment:
        lines.append("environment=" + ",".join(f'{k}="{v}"' for k, v in service.environment.items()))
    return "\n".join(lines) + "\n"


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise StackError(f"{what} not healthy after {timeout_s:.0f} s; see {log}")
        time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


# What a shell that runs `make up` may hold and no service should inherit: cloud keys, a person's
# MLflow login (`stack env`'s reviewer), a database login; each service is given its own.
CALLERS_CREDENTIALS = ("AWS_", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "INSECT_FEEDBACK__DATABASE_URL")


def _without_credentials() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith(CALLERS_CREDENTIALS)}
