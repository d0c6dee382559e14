"""`python -m benchmarks.load` (`make loadtest`): the Bento under load, driven by locust.

For each serving configuration (TVM or eager backend, batching on or off), the registry's
champion (run `make demo` first) is served by `bentoml serve` on a free port, and locust, headless
and in its own process, runs a closed loop of 1, 16 and 64 users on `/predict` for `--seconds`
each; the TVM configuration also runs the mixed profile (predictions, corrections, model reads).
Per run: throughput, p50/p95/p99, the answers that were not 2xx, and where a request's time went,
from the service's own `insect_request_phase_seconds` on /metrics. Writes benchmarks/LOAD.md,
load.json and load.png. Locust shares the machine's cores with the service: what it costs the
service is part of every figure.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from typing import Annotated

import httpx
import psutil
import typer
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.fixtures import BentoServer, redis_server
from config import Settings, get_settings
from config.ports import free_port
from feedback import db, keys
from ml.data import read_split
from ml.tracking import configure
from registry import version_by_alias

HERE = Path(__file__).parent
LOCUSTFILE = HERE / "locustfile.py"
PHASES = ("upload_parse", "decode", "preprocess", "queue", "model", "image_store", "database")
# name -> the service's settings for it
CONFIGS = {
    "tvm, batching": {"INSECT_SERVE__BACKEND": "tvm"},
    "tvm, no batching": {"INSECT_SERVE__BACKEND": "tvm", "INSECT_SERVE__MAX_BATCH_SIZE": "1"},
    # as `make up` and compose serve: the workers count rate limits together in Redis
    "tvm, batching, 2 workers": {
        "INSECT_SERVE__BACKEND": "tvm",
        "INSECT_SERVE__WORKERS": "2",
        "INSECT_SERVE__RATE_LIMIT_STORE": "redis",
    },
    # the model's threads on every core, none left to the request path (the default before)
    "tvm, batching, model on every core": {
        "INSECT_SERVE__BACKEND": "tvm",
        "INSECT_SERVE__MODEL_THREADS": str(psutil.cpu_count(logical=False) or 1),
    },
    "eager, batching": {"INSECT_SERVE__BACKEND": "eager"},
    "eager, no batching": {"INSECT_SERVE__BACKEND": "eager", "INSECT_SERVE__MAX_BATCH_SIZE": "1"},
}
UNLIMITED = json.dumps({role: "1000000/minute" for role in keys.ROLES})  # measure the service, not the rate limit


def run_locust(base: str, users: int, seconds: int, profile: str, env: dict[str, str], out: Path) -> dict:
    """One headless locust run; its summary for the request names it sent."""
    prefix = out / f"{profile}-{users}"
    locust = str(Path(sys.executable).with_name("locust"))  # the project's, whether or not its venv is on PATH
    command = [locust, "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r", str(users), "-t", f"{seconds}s"]
    command += ["-H", base, "--csv", str(prefix), "--only-summary", "--exit-code-on-error", "0"]
    locust_env = {**env, "LOAD_PROFILE": profile}
    subprocess.run(command, env=locust_env, cwd=out, check=True, capture_output=True, timeout=seconds + 60)
    with open(f"{prefix}_stats.csv") as stats:
        rows = {row["Name"]: row for row in csv.DictReader(stats)}
    with open(f"{prefix}_failures.csv") as failures:
        errors = Counter({f"{row['Name']}: {row['Error']}": int(row["Occurrences"]) for row in csv.DictReader(failures)})
    total = rows["Aggregated"]
    return {
        "users": users,
        "profile": profile,
        "requests": int(total["Request Count"]),
        "errors": int(total["Failure Count"]),
        "error_kinds": dict(errors),
        "rps": float(total["Requests/s"]),
        **{f"{name}_ms": float(total[column]) for name, column in (("p50", "50%"), ("p95", "95%"), ("p99", "99%"))},
        "predict_rps": float(rows["/predict"]["Requests/s"]),
        "predict_p99_ms": float(rows["/predict"]["99%"]),
    }


def phase_totals(base: str, admin: dict[str, str]) -> dict[str, tuple[float, float]]:
    """(sum of seconds, count) per /predict phase so far, from the service's /metrics (an admin's:
    `admin` holds the headers of an admin key)."""
    totals = {}
    metrics = httpx.get(f"{base}/metrics", headers=admin, timeout=10)
    metrics.raise_for_status()
    for family in text_string_to_metric_families(metrics.text):
        if family.name != "insect_request_phase_seconds":
            continue
        for sample in family.samples:
            if sample.labels.get("route") == "predict" and sample.name.endswith(("_sum", "_count")):
                done = totals.get(sample.labels["phase"], (0.0, 0.0))
                totals[sample.labels["phase"]] = (
                    (done[0] + sample.value, done[1]) if sample.name.endswith("_sum") else (done[0], done[1] + sample.value)
                )
    return totals


def mean_phases_ms(before: dict, after: dict) -> dict[str, float]:
    means = {}
    for phase in PHASES:
        seconds = after.get(phase, (0, 0))[0] - before.get(phase, (0, 0))[0]
        count = after.get(phase, (0, 0))[1] - before.get(phase, (0, 0))[1]
        means[phase] = 1000 * seconds / count if count else 0.0
    return means


def measure(settings: Settings, configs: list[str], users: list[int], seconds: int, out: Path) -> list[dict]:
    engine = db.engine(settings)
    key_name = f"loadtest-{uuid.uuid4().hex[:8]}"
    key_file = keys.key_in_file(engine, out / "key", name=key_name, role="admin")  # /metrics is an admin's
    admin = {"Authorization": f"Bearer {key_file.read_text().strip()}"}
    photos = out / "photos"
    photos.mkdir()
    dataset = settings.base_dataset_dir
    for name, _ in read_split(dataset, "test")[:32]:
        shutil.copy(dataset / "images" / name, photos / name)
    locust_env = {**os.environ, "LOAD_API_KEY_FILE": str(key_file), "LOAD_IMAGES": str(photos)}
    results = []
    with contextlib.ExitStack() as running:
        redis = running.enter_context(redis_server(out))  # for the configurations whose workers share limits
        running.callback(keys.revoke_key, engine, key_name)
        for config in configs:
            port = free_port()
            env = {**CONFIGS[config], "INSECT_SERVE__PORT": str(port), "INSECT_SERVE__RATE_LIMITS": UNLIMITED}
            if "INSECT_SERVE__RATE_LIMIT_STORE" in env:
                env["INSECT_SERVE__RATE_LIMIT_STORE"] = redis
            bento = BentoServer(port, out / f"bento-{config.replace(', ', '-').replace(' ', '_')}.log", env).start()
            try:
                bento.wait_ready()
                run_locust(bento.base, 4, 3, "predict", locust_env, out)  # warm-up: first calls, caches, pools
                profiles = [("predict", n) for n in users] + ([("mixed", n) for n in users] if config == configs[0] else [])
                for profile, n in profiles:
                    before = phase_totals(bento.base, admin)
                    result = run_locust(bento.base, n, seconds, profile, locust_env, out)
                    result |= {"config": config, "phases_ms": mean_phases_ms(before, phase_totals(bento.base, admin))}
                    print(
                        f"{config:20} {profile:8} {n:3} users: {result['rps']:6.1f} req/s  p50 {result['p50_ms']:5.0f}  "
                        f"p99 {result['p99_ms']:5.0f} ms  errors {result['errors']}",
                        flush=True,
                    )
                    results.append(result)
            finally:
                bento.stop()
    return results


def main(
    configs: Annotated[list[str] | None, typer.Option("--config", help=f"one of {list(CONFIGS)}; all by default")] = None,
    users: Annotated[list[int] | None, typer.Option(help="concurrent users, one run each")] = None,
    seconds: Annotated[int, typer.Option(help="length of each run")] = 20,
    report: Annotated[bool, typer.Option(help="write benchmarks/LOAD.md, load.json and load.png")] = True,
) -> None:
    settings = get_settings()
    configure(settings)
    champion = version_by_alias(settings.registered_model_name, settings.serve.alias)
    if champion is None:
        name, alias = settings.registered_model_name, settings.serve.alias
        raise typer.BadParameter(f"no {name!r} version is {alias!r}: run `make demo` first")
    for config in configs or []:
        if config not in CONFIGS:
            raise typer.BadParameter(f"unknown --config {config!r}; choose from {list(CONFIGS)}")
    with tempfile.TemporaryDirectory(prefix="insect-load-") as tmp:
        results = measure(settings, configs or list(CONFIGS), users or [1, 16, 64], seconds, Path(tmp))
    if report:
        from benchmarks.load_report import write_load_report

        write_load_report(results, champion, seconds, HERE)


if __name__ == "__main__":
    typer.run(main)
