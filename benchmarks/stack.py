"""`python -m benchmarks.stack`: what `make up` costs on this machine, per Airflow executor.

For each executor, on a fresh data directory with the configured ports: the time from `make up`
to every service healthy; then one short DAG run (the drift watch, which finds no champion) so
the executor has started what it keeps for tasks (LocalExecutor forks `parallelism` workers at
the first task and keeps them); then the stack's processes and their summed resident memory,
then `make down`. DAGs start paused, so no training run adds its own processes. Writes
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

import httpx
import typer

from config import REPO_ROOT, Settings
from stack import Stack
from stack.layout import AIRFLOW_ADMIN

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
        stack = Stack(Settings(data_dir=data, stack={"executor": executor, "workers": 2}))
        run_one_dag(stack, "drift_watch")
        processes = stack.processes()
        rss = sum(process.memory_info().rss for process in processes)
        print(f"{executor}: healthy in {seconds:.0f} s, {len(processes)} processes, {rss / 2**30:.2f} GiB")
        return {"seconds": seconds, "processes": len(processes), "rss_gib": rss / 2**30}
    finally:
        subprocess.run([*stack_command, "down"], env=env, cwd=REPO_ROOT, check=False)
        shutil.rmtree(data, ignore_errors=True)


def run_one_dag(stack: Stack, dag_id: str) -> None:
    """Unpause `dag_id`, trigger it through Airflow's REST API and wait for its run to end."""
    login = {"username": AIRFLOW_ADMIN, "password": stack.secrets["airflow_admin_password"]}
    token = httpx.post(f"{stack.url('airflow')}/auth/token", json=login, timeout=30).raise_for_status().json()
    headers = {"Authorization": f"Bearer {token['access_token']}"}
    with httpx.Client(base_url=f"{stack.url('airflow')}/api/v2", headers=headers, timeout=30) as api:
        deadline = time.monotonic() + 300
        while api.patch(f"/dags/{dag_id}", json={"is_paused": False}).status_code == 404:  # not parsed yet
            _wait(deadline, f"{dag_id} to appear")
        run = api.post(f"/dags/{dag_id}/dagRuns", json={"logical_date": None}).raise_for_status().json()["dag_run_id"]
        while api.get(f"/dags/{dag_id}/dagRuns/{run}").json()["state"] not in ("success", "failed"):
            _wait(deadline, f"{dag_id}'s run to end")


def _wait(deadline: float, what: str) -> None:
    if time.monotonic() > deadline:
        raise TimeoutError(f"waited 300 s for {what}")
    time.sleep(2)


def main(report: Annotated[Path, typer.Option(help="where the table goes")] = HERE / "STACK.md") -> None:
    rows = {executor: measure(executor, env) for executor, env in EXECUTORS.items()}
    lines = [
        "# What `make up` costs",
        "",
        f"`python -m benchmarks.stack` on this machine ({os.cpu_count()} cores): a fresh data directory, "
        "`make up` until every service is healthy, one short DAG run (so the executor has started what it keeps "
        "for tasks), then the stack's processes and their summed resident memory (shared pages counted in each "
        "process), then `make down`. Airflow's `parallelism` is 2 (`INSECT_STACK__PARALLELISM`); CeleryExecutor "
        "with 2 workers.",
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
