"""The Bento under faults, over HTTP: killed with SIGKILL while feedback pours in, and its
PostgreSQL stopped while predictions are asked for."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import boto3
import httpx
import pytest
import sqlalchemy as sa

from config import get_settings
from feedback import db, keys, postgres
from ml.data import read_classes
from tests.support import BentoServer, bento_env, free_port, photo_bytes, register_tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture
def bento(tmp_path, tiny_dataset, s3_endpoint, request):
    """A factory: the service on a PostgreSQL of its own (so a test may stop it) and a fresh
    bucket, serving a tiny registered champion; returns (server, cluster, labeler headers)."""
    cluster = Path(tempfile.mkdtemp(prefix="insect-pg-faults-")) / "cluster"  # /tmp: the server may run as `postgres`
    cluster.parent.chmod(0o755)
    port, pg_port = free_port(), free_port()
    database_url = postgres.ensure_running(cluster, pg_port)
    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    env = bento_env(tmp_path, port, database_url, s3_endpoint, bucket)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        get_settings.cache_clear()
        register_tiny_model(read_classes(tiny_dataset), seed=0)
        labeler = keys.create_key(db.engine(get_settings()), name="labeler", role="labeler")
        server = BentoServer(port, tmp_path / "bento.log").start().wait_ready()
        try:
            yield server, cluster, {"Authorization": f"Bearer {labeler}"}, bucket
        finally:
            server.stop()
            postgres.stop(cluster)
            shutil.rmtree(cluster.parent, ignore_errors=True)
            get_settings.cache_clear()


def test_1000_feedback_posts_retried_through_two_sigkills_land_exactly_once(bento, tiny_dataset):
    """32 clients post 1,000 corrections, each retrying with its Idempotency-Key until a 2xx; the
    Bento is killed with SIGKILL twice meanwhile and started again. Afterwards: exactly 1,000 rows
    and 1,000 stored images, none twice, none missing."""
    server, _, labeler, bucket = bento
    classes = read_classes(tiny_dataset)
    posts = [(f"fault-{i}", photo_bytes(i)) for i in range(1000)]
    answers: dict[str, int] = {}
    retries = 0

    async def client(queue: asyncio.Queue) -> None:
        nonlocal retries
        async with httpx.AsyncClient(base_url=server.base, headers=labeler, timeout=30) as http:
            while not queue.empty():
                key, image = queue.get_nowait()
                while key not in answers:
                    try:
                        response = await http.post(
                            "/feedback",
                            files={"image": ("bug.png", image, "image/png")},
                            data={"predicted_label": classes[0], "corrected_label": classes[1], "user_id": key},
                            headers={"Idempotency-Key": key},
                        )
                        if response.status_code == 200:
                            answers[key] = response.json()["feedback_id"]
                            continue
                        assert response.status_code in (502, 503), response.text  # never a 4xx or a 500
                    except httpx.TransportError:
                        pass  # the server is dead or starting: retry, as a client would
                    retries += 1
                    await asyncio.sleep(0.2)

    def crash_twice() -> None:
        for after in (250, 600):
            while len(answers) < after:
                time.sleep(0.05)
            server.kill()
            server.start().wait_ready()

    async def run() -> None:
        queue = asyncio.Queue()
        for post in posts:
            queue.put_nowait(post)
        await asyncio.gather(*(client(queue) for _ in range(32)))

    killer = threading.Thread(target=crash_twice)
    killer.start()
    asyncio.run(run())
    killer.join()

    assert len(answers) == 1000 and len(set(answers.values())) == 1000
    engine = sa.create_engine(get_settings().feedback.database_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(db.feedback.c.user_id, db.feedback.c.image_sha256)).all()
    assert sorted(row.user_id for row in rows) == sorted(key for key, _ in posts)  # each once
    s3 = boto3.client("s3", endpoint_url=get_settings().feedback.s3_endpoint_url)
    stored = [obj["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket) for obj in page["Contents"]]
    expected = {hashlib.sha256(image).hexdigest() for _, image in posts}
    assert len(stored) == 1000 and {Path(key).stem for key in stored} == expected
    print(f"1,000 corrections, 2 SIGKILLs: {retries} retries, 1,000 rows, 1,000 images")


def test_predictions_keep_answering_while_postgresql_is_down_and_storage_comes_back(bento, tiny_dataset):
    """8 clients ask for predictions for 10 s, then PostgreSQL stops for 20 s, then runs again:
    every answer is a 2xx or a 503, predictions keep coming while it is down (without an id, which
    says they were not stored), and stored predictions come back without restarting the Bento."""
    server, cluster, labeler, _ = bento
    image = (tiny_dataset / "images" / next((tiny_dataset / "images").iterdir()).name).read_bytes()
    answers: list[tuple[float, int, bool, float]] = []  # (time, status, stored, latency)
    stop = time.monotonic() + 45

    async def client() -> None:
        async with httpx.AsyncClient(base_url=server.base, headers=labeler, timeout=30) as http:
            while time.monotonic() < stop:
                started = time.monotonic()
                response = await http.post("/predict", files={"image": ("bug.jpg", image, "image/jpeg")})
                stored = response.status_code == 200 and response.json()["prediction_id"] is not None
                answers.append((started, response.status_code, stored, time.monotonic() - started))

    def outage() -> tuple[float, float, float]:
        time.sleep(10)
        postgres.stop(cluster)
        down = time.monotonic()
        storage = httpx.get(f"{server.base}/health/storage", timeout=30)
        assert storage.status_code == 503 and storage.json()["images"] == "ok", storage.text
        correction = {"prediction_id": str(uuid.uuid4()), "corrected_label": read_classes(tiny_dataset)[0]}
        feedback = httpx.post(f"{server.base}/feedback", data=correction, headers=labeler, timeout=30)
        assert feedback.status_code == 503 and feedback.headers["retry-after"], feedback.text
        time.sleep(20 - (time.monotonic() - down))
        restarting = time.monotonic()  # PostgreSQL takes connections before ensure_running returns
        postgres.ensure_running(cluster, sa.make_url(get_settings().feedback.database_url).port)
        return down, restarting, time.monotonic()

    async def run() -> tuple[float, float, float]:
        window = asyncio.to_thread(outage)
        result, *_ = await asyncio.gather(window, *(client() for _ in range(8)))
        return result

    down, restarting, up = asyncio.run(run())
    assert {status for _, status, _, _ in answers} <= {200, 503}
    before = [latency for t, status, _, latency in answers if t < down and status == 200]
    during = [a for a in answers if down + 1 < a[0] and a[0] + a[3] < restarting]
    after = [a for a in answers if a[0] > up + 2 * get_settings().serve.storage_retry_s]
    assert len(during) > 100, len(during)
    wrong = [(round(t - down, 2), status, stored) for t, status, stored, _ in during if status != 200 or stored]
    assert not wrong, f"(s after the stop, status, stored) while down, restart at {restarting - down:.2f} s: {wrong}"
    assert after and all(stored for _, status, stored, _ in after if status == 200)
    assert httpx.get(f"{server.base}/health/storage", timeout=30).status_code == 200
    slices = {"before": before, "during": [latency for *_, latency in during]}
    p99 = {name: statistics.quantiles(latencies, n=100)[98] for name, latencies in slices.items()}
    assert p99["during"] < 1.0, p99  # a stall would be the storage timeout, 5 s, per request
    print(f"predictions: p99 {p99['before'] * 1000:.0f} ms before, {p99['during'] * 1000:.0f} ms while PostgreSQL was down")
