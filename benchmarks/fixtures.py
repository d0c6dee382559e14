"""Servers and a model that the benchmarks and the tests both start: a Redis server, the Bento
(`bentoml serve`) on a port of its own, and an untrained tiny classifier registered as champion."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import torch

from config import REPO_ROOT, get_settings
from config.ports import free_port
from ml.compile import export
from ml.model import SpeciesClassifier, build_coca
from ml.runtime import EXPORTED_KEY
from ml.tracking import RunLog
from registry import promote, register_model


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    """A redis-server on a free localhost port, nothing saved to disk; yields its URL."""
    import redis

    port = free_port()
    command = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    server = subprocess.Popen(command, cwd=directory, stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, socket_timeout=1)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(10)


def register_tiny_model(classes: list[str], seed: int, champion: bool = True) -> str:
    """Register an untrained tiny classifier in the configured registry; returns its version."""
    torch.manual_seed(seed)
    model = SpeciesClassifier.from_coca(build_coca("coca_tiny", vocab_size=50), classes).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt2"
        torch.export.save(export(model), path)
        model_config = {"classes": classes, "image_size": model.image_size}
        run = RunLog.start(get_settings(), run_name="tiny model")
        version = register_model(get_settings(), {EXPORTED_KEY: path}, model_config, {}, run)
    if champion:
        promote(get_settings().registered_model_name, version.version)
    return str(version.version)


class BentoServer:
    """`bentoml serve` of the service on `port`, its output in `log`, in this process's
    environment (set up with `bento_env`) with `env` over it."""

    def __init__(self, port: int, log: Path, env: dict[str, str] | None = None):
        self.port, self.log, self.env = port, log, env or {}
        self.base = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> BentoServer:
        bentoml = str(Path(sys.executable).with_name("bentoml"))
        with open(self.log, "a") as out:
            self.process = subprocess.Popen(
                [bentoml, "serve", "bentos.service:InsectClassifier", "--port", str(self.port)],
                cwd=REPO_ROOT,
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    def wait_ready(self, timeout_s: float = 180, probe: str = "/readyz") -> BentoServer:
        """Wait until `probe` (/readyz: the model is served; /livez: the server answers) says 200."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the Bento exited: {self.log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.base}{probe}", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(self.log.read_text()[-4000:])

    def tree(self) -> list[psutil.Process]:
        """The server and its workers (which BentoML starts in process groups of their own)."""
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def kill(self) -> None:
        """SIGKILL to the server and every worker at once: a crash, nothing cleaned up."""
        processes = self.tree()
        for process in processes:
            process.kill()
        psutil.wait_procs(processes, timeout=30)
        self.process.wait(30)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)
