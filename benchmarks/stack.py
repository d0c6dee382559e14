"""`python -m benchmarks.stack`: what `make up` costs on this machine, per Airflow executor.

For each executor, on a fresh data directory with the configured ports: the time from `make up`
to every service healthy, then (idle, before the scheduler's first training run has started a
task process) the stack's processes and their resident memory, then `make down`. Writes
benchmarks/STACK.md. The stack must not be running.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from config import REPO_ROOT, Settings
from stack import Stack

HERE = Path(__file__).parent
EXECUTORS = {"LocalExecutor": {}, "CeleryExecutor": {"INSECT_STACK__EXECUTOR": "celery", "INSECT_STACK__WORKERS": "2"}}


def measure(executor: str, extra_env: dict[str, str]) -> dict[str, float]:
    data = Path(tempfile.mkdtemp(prefix="insect-stack-bench-"))
    os.chmod(data, 0o755)  # PostgreSQL runs as `postgres` when we are root
    # the scheduler would start training at once: paused DAGs keep the measurement idle
    env = {**os.environ, **extra_env, "INSECT_DATA_DIR": str(data), "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True"}
    env.pop("MLFLOW_TRACKING_URI", None)
    stack_command = [sys.executable, "-m", "stack"]
    try:
        started = time.monotonic()
        subprocess.run([*stack_command, "up"], env=env, cwd=REPO_ROOT, check=True, capture_output=True)
        seconds = time.monotonic() - started
        settings = Settings(data_dir=data, stack={"executor": executor, "workers": 2})
        processes = Stack(settings).processes()
        rss = sum(process.memory_info().rss for process in processes)
        print(f"{executor}: healthy in {seconds:.0f} s, {len(processes)} processes, {rss / 2**30:.2f} GiB")
        return {"seconds": seconds, "processes": len(processes), "rss_gib": rss / 2**30}
    finally:
        subprocess.run([*stack_command, "down"], env=env, cwd=REPO_ROOT, check=False)
        shutil.rmtree(data, ignore_errors=True)


def main(report: Annotated[Path, typer.Option(help="where the table goes")] = HERE / "STACK.md") -> None:
    rows = {executor: measure(executor, env) for executor, env in EXECUTORS.items()}
    lines = [
        "# What `make up` costs",
        "",
        f"`python -m benchmarks.stack` on this machine ({os.cpu_count()} cores): a fresh data directory, "
        "`make up` until every service is healthy, then the stack's processes and their resident memory, "
        "idle (DAGs paused, so no task runs), then `make down`. CeleryExecutor with 2 workers.",
        "",
        "| executor | `make up` to healthy | processes | resident memory |",
        "|---|---|---|---|",
        *(f"| {e} | {r['seconds']:.0f} s | {r['processes']} | {r['rss_gib']:.2f} GiB |" for e, r in rows.items()),
        "",
    ]
    report.write_text("\n".join(lines))
    print(f"wrote {report}")


if __name__ == "__main__":
    typer.run(main)
