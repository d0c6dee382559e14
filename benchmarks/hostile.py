"""`python -m benchmarks.hostile` (`make hostile`): does a stranger slow a good client down?

The registry's champion (or, without one, an untrained tiny model registered in a temp data dir)
is served by `bentoml serve` with one worker, on PostgreSQL and the configured image store. One
good client (a valid client key, one request at a time on /predict, in this process) is timed
  A. alone,
  B. beside 64 senders of made-up keys on /predict, and
  C. beside 300 slow uploads to /app/identify without a session,
each for `--seconds`; the hostile clients run in processes of their own
(`benchmarks/hostile_clients.py`). B and C pass when the good client had no failed request and a
p99 within 3x its alone figure. Two checks follow: a 200 MB form to /app/sign-in (announced, and
chunked) must be refused with 413 before it is read, and 2,000 requests to made-up paths must
leave /metrics with as many samples as before. Writes benchmarks/HOSTILE.md, hostile.json and
hostile.png; exits 1 when a criterion fails (`--no-fail`: 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated
from unittest import mock

import httpx
import numpy as np
import psutil
import typer

from benchmarks.fixtures import BentoServer, register_tiny_model
from benchmarks.hostile_clients import request_head, send_until_answered
from benchmarks.hostile_report import P99_RATIO, QUANTILES, write_hostile_report
from benchmarks.load import UNLIMITED
from config import REPO_ROOT, Settings, SyntheticDataConfig, get_settings
from config.ports import free_port
from feedback import db, keys, postgres
from ml.data import read_classes, read_split
from ml.data.synthetic import generate_synthetic
from ml.tracking import configure
from registry import version_by_alias

HERE = Path(__file__).parent
PHASES = {"alone": None, "made-up keys": "made-up-keys", "slow uploads": "slow-uploads"}
FLOOD_PROCESSES = 4  # the made-up-key senders are spread over these, so no one interpreter caps them
RAMP_S = 2.0  # the hostile clients connect for this long before the good client starts, and go on this long after
FORM_CHUNK = 64 * 1024
FORM_TIMEOUT_S = 60.0  # a form not answered by then is recorded as such (reading 200 MB at 2 MB/s takes 100 s)
# bytes a client may have sent when a refusal comes and the body still be unread: what the
# loopback's socket buffers take in without the server reading a byte
UNREAD_BOUND = 16 * 2**20
WARMUP_PATHS = 10  # the first made-up paths may add the one label all of them share
PATH_SENDERS = 200  # made-up paths asked for at once


class GoodClient:
    """A client with a valid key sending POST /predict one at a time, cycling through `photos`."""

    def __init__(self, base: str, key: str, photos: list[bytes]):
        self.client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        self.photos = itertools.cycle(photos)
        self.model: dict = {}

    def run(self, seconds: float) -> dict:
        """Send for `seconds`: requests, failed (not 2xx or no answer), and the 2xx answers' latency."""
        latencies, statuses = [], Counter()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                response = self.client.post("/predict", files={"image": ("bug.jpg", next(self.photos), "image/jpeg")})
            except httpx.TransportError as error:
                statuses[type(error).__name__] += 1
                continue
            statuses[str(response.status_code)] += 1
            if response.is_success:  # a quick refusal is a failure, not a fast answer
                latencies.append(1000 * (time.perf_counter() - started))
                self.model = response.json()["model"]
        ms = np.array(latencies or [float("nan")])
        failed = sum(n for status, n in statuses.items() if not status.startswith("2"))
        return {
            "requests": sum(statuses.values()),
            "failed": failed,
            "statuses": dict(statuses),
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
            "quantiles_ms": [round(float(q), 3) for q in np.percentile(ms, QUANTILES)],
        }


def beside(kind: str, base: str, connections: int, processes: int, seconds: float, good: Callable[[float], dict]):
    """`good(seconds)` while `connections` hostile clients of `kind` run in `processes` processes
    of their own; returns (the good client's figures, the hostile processes' answers added up
    and the cores they kept busy)."""
    used, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    shares = [connections // processes + (i < connections % processes) for i in range(processes)]
    command = [sys.executable, "-m", "benchmarks.hostile_clients", kind, base, str(seconds + 2 * RAMP_S)]
    running = [
        subprocess.Popen([*command, str(share)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True) for share in shares if share
    ]
    try:
        time.sleep(RAMP_S)
        ours = good(seconds)
        theirs = [json.loads(process.communicate(timeout=seconds + 120)[0]) for process in running]
    finally:
        for process in running:
            if process.poll() is None:
                process.kill()
    done = resource.getrusage(resource.RUSAGE_CHILDREN)  # the hostile processes are the only children waited for
    cpu_s = done.ru_utime + done.ru_stime - used.ru_utime - used.ru_stime
    return ours, merged(theirs) | {"cores": cpu_s / (time.monotonic() - started), "window_s": seconds + 2 * RAMP_S}


def cpu_s(processes: list[psutil.Process]) -> float:
    """CPU seconds (user and system) the processes have used so far."""
    return sum(sum(process.cpu_times()[:2]) for process in processes)


def big_form(base: str, size: int, chunked: bool) -> dict:
    """POST a `size`-byte form to /app/sign-in, with its Content-Length or chunked: the answer,
    how long it took, and how much of the form had gone out when it came."""
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    headers |= {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(size)}

    def pieces() -> Iterator[bytes]:  # streamed: 200 MB is never in memory
        yield b"api_key="
        for start in range(len(b"api_key="), size, FORM_CHUNK):
            yield b"a" * min(FORM_CHUNK, size - start)

    def framed() -> Iterator[bytes]:
        for piece in pieces():
            yield b"%x\r\n%s\r\n" % (len(piece), piece)
        yield b"0\r\n\r\n"

    body = framed() if chunked else pieces()
    answer = asyncio.run(
        send_until_answered(base, request_head(base, "POST", "/app/sign-in", headers), body, 0.0, FORM_TIMEOUT_S)
    )
    return {
        "framing": "chunked" if chunked else "Content-Length",
        "bytes": size,
        "status_line": answer.status,
        "status": answer.code,
        "seconds": answer.seconds,
        "sent": answer.sent,
    }


def metrics_size(client: httpx.Client) -> dict:
    """/metrics now: its size, its sample lines and those of `bentoml_service_request_total`."""
    response = client.get("/metrics")
    samples = [line for line in response.text.splitlines() if line and not line.startswith("#")]
    return {
        "status": response.status_code,
        "bytes": len(response.content),
        "samples": len(samples),
        "request_total_samples": sum(line.startswith("bentoml_service_request_total") for line in samples),
    }


def unknown_paths(admin: httpx.Client, count: int) -> dict:
    """/metrics (read by `admin`) before and after `count` requests without a key to made-up paths."""
    with httpx.Client(base_url=admin.base_url, timeout=30, limits=httpx.Limits(max_connections=PATH_SENDERS)) as client:
        for _ in range(WARMUP_PATHS):  # a catch-all label, if there is one, is there from the first
            client.get(f"/no-such-route-{uuid.uuid4()}")
        metrics_size(admin)  # so that /metrics's own label is there before we count
        before = metrics_size(admin)
        # at once: each refusal waits out the service's delay for strangers (serve.stranger_delay_s)
        with ThreadPoolExecutor(PATH_SENDERS) as senders:
            answers = senders.map(lambda _: client.get(f"/no-such-route-{uuid.uuid4()}").status_code, range(count))
            statuses = Counter(str(status) for status in answers)
        after = metrics_size(admin)
    return {"requests": count, "statuses": dict(statuses), "before": before, "after": after}


def verdicts(results: dict) -> dict[str, bool]:
    """Each criterion of the benchmark, by name: whether it passed."""
    phases, alone = results["phases"], results["phases"]["alone"]["p99_ms"]
    passed = {}
    for name in ("made-up keys", "slow uploads"):
        phase = phases[name]
        passed[f"{name}: no failed requests"] = phase["failed"] == 0 and phase["requests"] > 0
        passed[f"{name}: p99 within {P99_RATIO:g}x alone"] = bool(phase["p99_ms"] <= P99_RATIO * alone)
    for form in results["big_forms"]:
        passed[f"{form['bytes'] / 1e6:g} MB form ({form['framing']}): 413 before it is read"] = (
            form["status"] == 413 and form["sent"] <= UNREAD_BOUND
        )
    metrics = results["unknown_paths"]
    passed[f"{metrics['requests']} made-up paths: /metrics keeps its samples"] = (
        metrics["after"]["status"] == 200 and metrics["after"]["samples"] == metrics["before"]["samples"]
    )
    return passed


def measure(
    settings: Settings, dataset: Path, out: Path, seconds: float, senders: int, uploads: int, form_bytes: int, paths: int
) -> dict:
    """Serve the configured champion with one worker and run the phases and checks against it."""
    db.migrate_once(db.database_url(settings))  # as a deploy does (a no-op on a migrated database)
    engine = db.engine(settings)
    suffix = uuid.uuid4().hex[:8]
    client_key = keys.create_key(engine, name=f"hostile-client-{suffix}", role="client")
    admin_key = keys.create_key(engine, name=f"hostile-admin-{suffix}", role="admin")
    photos = [(dataset / "images" / name).read_bytes() for name, _ in read_split(dataset, "test")[:32]]
    port = free_port()
    # one worker; the keys' own limits out of the way (the good client must not meet them), the
    # limits on unknown keys and every other guard as configured
    service_env = {"INSECT_SERVE__PORT": str(port), "INSECT_SERVE__WORKERS": "1", "INSECT_SERVE__RATE_LIMITS": UNLIMITED}
    bento = BentoServer(port, out / "bento.log", service_env).start()
    results: dict = {"phases": {}, "hostile": {}}
    try:
        bento.wait_ready()
        good = GoodClient(bento.base, client_key, photos)
        good.run(3)  # warm-up: first calls, caches, pools
        # the admin key is known before the made-up keys come: a key the service has not seen yet
        # may wait with them, when its address is over its budget of unknown keys
        admin = httpx.Client(base_url=bento.base, headers={"Authorization": f"Bearer {admin_key}"}, timeout=30)
        metrics_size(admin)
        service = bento.tree()
        for phase, kind in PHASES.items():
            used, started = cpu_s(service), time.monotonic()
            if kind is None:
                figures = good.run(seconds)
            else:
                connections, processes = (senders, FLOOD_PROCESSES) if kind == "made-up-keys" else (uploads, 1)
                figures, theirs = beside(kind, bento.base, connections, processes, seconds, good.run)
                results["hostile"][phase] = theirs | {"connections": connections, "processes": processes}
            figures["service_cores"] = (cpu_s(service) - used) / (time.monotonic() - started)
            results["phases"][phase] = figures
            p50, p99 = figures["p50_ms"], figures["p99_ms"]
            print(f"{phase:13} {figures['requests']:5} requests, {figures['failed']} failed, p50 {p50:.1f}, p99 {p99:.1f} ms")
        results["big_forms"] = [big_form(bento.base, form_bytes, chunked) for chunked in (False, True)]
        results["unknown_paths"] = unknown_paths(admin, paths)
        results["service"] = {
            "model": good.model,
            "workers": 1,
            "max_in_flight": settings.serve.max_in_flight,
            "key_rate_limits": "none reached (1,000,000/minute a key)",
            "unknown_key_limit": settings.serve.unknown_key_limit,
            "stranger_delay_s": settings.serve.stranger_delay_s,
            "max_form_bytes": settings.serve.max_form_bytes,
            "max_image_bytes": settings.feedback.max_image_bytes,
            "database": engine.url.render_as_string(hide_password=True),
            "image_store": f"S3 bucket {settings.feedback.s3_bucket}" if settings.feedback.s3_bucket else "local files",
        }
    finally:
        bento.stop()
        for name in (f"hostile-client-{suffix}", f"hostile-admin-{suffix}"):
            keys.revoke_key(engine, name)
    return results


def merged(answers: list[dict]) -> dict:
    """The hostile processes' counts added up (a slow-upload run is one process: its answer as is)."""
    if len(answers) == 1:
        return answers[0]
    return {
        "requests": sum(a["requests"] for a in answers),
        "statuses": dict(sum((Counter(a["statuses"]) for a in answers), Counter())),
    }


@contextlib.contextmanager
def served_model(tmp: Path) -> Iterator[tuple[Settings, Path, str]]:
    """(settings, a dataset with test photos, which model) for the champion of the configured
    registry; without one, an untrained tiny model registered in a data dir under `tmp`, the
    environment pointing there (the service inherits it) until the block ends."""
    settings = get_settings()
    champion, registry = None, settings.tracking_uri
    if settings.mlflow_tracking_uri or (settings.data_dir / "mlflow.db").exists():  # else there is no registry to open
        configure(settings)
        champion = version_by_alias(settings.registered_model_name, settings.serve.alias)
    if champion is not None:
        served = f"{champion.name} v{champion.version}, the registry's {settings.serve.alias}"
        with embedded_database_left_as_found(settings):
            yield settings, settings.base_dataset_dir, served
        return
    os.chmod(tmp, 0o755)  # an embedded PostgreSQL runs as `postgres` when we are root
    dataset = generate_synthetic(
        tmp / "dataset", SyntheticDataConfig(num_classes=4, images_per_class=10, min_test_images_per_class=0)
    )
    env = {
        "INSECT_DATA_DIR": str(tmp / "data"),
        "INSECT_DATASET_DIR": str(dataset),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'data' / 'mlflow.db'}",
        "INSECT_FEEDBACK__POSTGRES_PORT": str(free_port()),  # an embedded cluster of its own, if one is used
    }
    with mock.patch.dict(os.environ, env):
        get_settings.cache_clear()
        try:
            settings = get_settings()
            with embedded_database_left_as_found(settings):
                configure(settings)
                version = register_tiny_model(read_classes(dataset), seed=0)
                alias = settings.serve.alias
                yield (
                    settings,
                    dataset,
                    f"an untrained tiny model, v{version} of a temp registry (no {alias!r} version in {registry})",
                )
        finally:
            get_settings.cache_clear()


@contextlib.contextmanager
def embedded_database_left_as_found(settings: Settings) -> Iterator[None]:
    """The embedded PostgreSQL cluster stopped again afterwards, if the run started it."""
    running_before = bool(settings.feedback.database_url) or postgres.is_running(settings.postgres_dir)
    try:
        yield
    finally:
        if not running_before and postgres.is_running(settings.postgres_dir):
            db.engine(settings).dispose()
            postgres.stop(settings.postgres_dir)


def main(
    seconds: Annotated[float, typer.Option(help="length of each phase")] = 20,
    senders: Annotated[int, typer.Option(help="concurrent senders of made-up keys (phase B)")] = 64,
    slow_uploads: Annotated[int, typer.Option(help="concurrent slow uploads (phase C)")] = 300,
    form_mb: Annotated[float, typer.Option(help="size of the form sent to /app/sign-in, in MB")] = 200,
    unknown_paths_count: Annotated[int, typer.Option("--unknown-paths", help="requests to made-up paths")] = 2000,
    report_dir: Annotated[Path, typer.Option(help="where HOSTILE.md, hostile.json and hostile.png go")] = HERE,
    report: Annotated[bool, typer.Option(help="write the report")] = True,
    fail: Annotated[bool, typer.Option(help="exit 1 when a criterion fails")] = True,
) -> None:
    with tempfile.TemporaryDirectory(prefix="insect-hostile-") as tmp, served_model(Path(tmp)) as (settings, dataset, model):
        results = measure(settings, dataset, Path(tmp), seconds, senders, slow_uploads, int(form_mb * 1e6), unknown_paths_count)
    results |= {
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "machine": {"cores": psutil.cpu_count(), "cpu": platform.processor() or platform.machine()},
        "seconds": seconds,
        "served": model,
    }
    results["verdicts"] = verdicts(results)
    results["passed"] = all(results["verdicts"].values())
    for criterion, ok in results["verdicts"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {criterion}")
    if report:
        write_hostile_report(results, report_dir)
    if fail and not results["passed"]:
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
