"""The Bento under faults, over HTTP: killed with SIGKILL while feedback pours in; its PostgreSQL
stopped, then hanging, and its S3 store down while predictions are asked for; started while
PostgreSQL, S3 and MLflow are all down."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
import httpx
import psutil
import pytest
import sqlalchemy as sa

from benchmarks.fixtures import BentoServer, register_tiny_model
from config import get_settings
from feedback import db, keys, postgres
from ml.data import read_classes
from tests.support import S3Server, bento_env, free_port, photo_bytes

pytestmark = pytest.mark.slow


@dataclass
class Stores:
    """The stores of one test's Bento, each of its own so that the test may stop it."""

    cluster: Path
    database_url: str
    s3: S3Server
    bucket: str

    def start_database(self) -> None:
        postgres.ensure_running(self.cluster, sa.make_url(self.database_url).port)

    def postgres_processes(self) -> list[psutil.Process]:
        """The postmaster and its children: what SIGSTOP freezes (the sockets stay open: a hang, not a refusal)."""
        postmaster = psutil.Process(int((self.cluster / "postmaster.pid").read_text().split()[0]))
        return [postmaster, *postmaster.children(recursive=True)]


@pytest.fixture
def stores(tmp_path):
    """A migrated PostgreSQL, an S3 API with a bucket, all this test's own."""
    cluster = Path(tempfile.mkdtemp(prefix="insect-pg-faults-")) / "cluster"  # /tmp: the server may run as `postgres`
    cluster.parent.chmod(0o755)
    database_url = postgres.ensure_running(cluster, free_port())
    db.migrate(database_url)  # as a deploy does: the service never migrates
    s3 = S3Server().start()
    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3.url).create_bucket(Bucket=bucket)
    try:
        yield Stores(cluster, database_url, s3, bucket)
    finally:
        s3.stop()
        postgres.stop(cluster)
        shutil.rmtree(cluster.parent, ignore_errors=True)


@pytest.fixture
def bento(tmp_path, tiny_dataset, stores):
    """The service on `stores`, serving a tiny registered champion; returns (server, stores,
    labeler headers)."""
    port = free_port()
    env = bento_env(tmp_path, port, stores.database_url, stores.s3.url, stores.bucket)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        get_settings.cache_clear()
        register_tiny_model(read_classes(tiny_dataset), seed=0)
        labeler = keys.create_key(db.engine(get_settings()), name="labeler", role="labeler")
        server = BentoServer(port, tmp_path / "bento.log").start().wait_ready()
        try:
            yield server, stores, {"Authorization": f"Bearer {labeler}"}
        finally:
            server.stop()
            get_settings.cache_clear()


def test_1000_feedback_posts_retried_through_two_sigkills_land_exactly_once(bento, tiny_dataset):
    """32 clients post 1,000 corrections, each retrying with its Idempotency-Key until a 2xx; the
    Bento is killed with SIGKILL twice meanwhile and started again. Afterwards: exactly 1,000 rows
    and 1,000 stored images, none twice, none missing."""
    server, stores, labeler = bento
    bucket = stores.bucket
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

    clients_done = threading.Event()  # a failed client must not leave this thread waiting (pytest would never exit)

    def crash_twice() -> None:
        for after in (250, 600):
            while len(answers) < after:
                if clients_done.wait(0.05):
                    return
            server.kill()
            server.start().wait_ready()

    async def run() -> None:
        queue = asyncio.Queue()
        for post in posts:
            queue.put_nowait(post)
        await asyncio.gather(*(client(queue) for _ in range(32)))

    killer = threading.Thread(target=crash_twice)
    killer.start()
    try:
        asyncio.run(run())
    finally:
        clients_done.set()
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
    server, stores, labeler = bento
    cluster = stores.cluster
    image = (tiny_dataset / "images" / next((tiny_dataset / "images").iterdir()).name).read_bytes()

    def outage() -> tuple[float, float, float]:
        time.sleep(10)
        postgres.stop(cluster)
        down = time.monotonic()
        assert storage_health(server, within_s=15) == {"database": "down", "images": "up"}
        correction = {"prediction_id": str(uuid.uuid4()), "corrected_label": read_classes(tiny_dataset)[0]}
        feedback = httpx.post(f"{server.base}/feedback", data=correction, headers=labeler, timeout=30)
        assert feedback.status_code == 503 and feedback.headers["retry-after"], feedback.text
        time.sleep(20 - (time.monotonic() - down))
        restarting = time.monotonic()  # PostgreSQL takes connections before ensure_running returns
        postgres.ensure_running(cluster, sa.make_url(get_settings().feedback.database_url).port)
        return down, restarting, time.monotonic()

    async def run() -> tuple[list, tuple[float, float, float]]:
        return await asyncio.gather(predictions(server, labeler, image, time.monotonic() + 45), asyncio.to_thread(outage))

    answers, (down, restarting, up) = asyncio.run(run())
    assert {status for _, status, _, _ in answers} <= {200, 503}
    before = [latency for t, status, _, latency in answers if t < down and status == 200]
    during = [a for a in answers if down + 1 < a[0] and a[0] + a[3] < restarting]
    after = [a for a in answers if a[0] > up + 2 * get_settings().serve.storage_retry_s]
    assert len(during) > 100, len(during)
    wrong = [(round(t - down, 2), status, stored) for t, status, stored, _ in during if status != 200 or stored]
    assert not wrong, f"(s after the stop, status, stored) while down, restart at {restarting - down:.2f} s: {wrong}"
    assert after and all(stored for _, status, stored, _ in after if status == 200)
    assert httpx.get(f"{server.base}/health/storage", timeout=5).json() == {"database": "up", "images": "up"}
    slices = {"before": before, "during": [latency for *_, latency in during]}
    p99 = {name: statistics.quantiles(latencies, n=100)[98] for name, latencies in slices.items()}
    assert p99["during"] < 1.0, p99  # a stall would be the storage timeout, 5 s, per request
    print(f"predictions: p99 {p99['before'] * 1000:.0f} ms before, {p99['during'] * 1000:.0f} ms while PostgreSQL was down")


def storage_health(server: BentoServer, within_s: float) -> dict[str, str]:
    """/health/storage once it has changed from what it said first (the monitor probes every
    `serve.storage_retry_s`), or what it says after `within_s`."""
    first = httpx.get(f"{server.base}/health/storage", timeout=5).json()
    deadline = time.monotonic() + within_s
    while (now := httpx.get(f"{server.base}/health/storage", timeout=5).json()) == first and time.monotonic() < deadline:
        time.sleep(0.5)
    return now


async def predictions(server: BentoServer, headers: dict, image: bytes, until: float, clients: int = 8) -> list[tuple]:
    """`clients` closed-loop clients asking for predictions until `until`: (start, status, stored, latency) each."""
    answers = []

    async def client() -> None:
        async with httpx.AsyncClient(base_url=server.base, headers=headers, timeout=60) as http:
            while time.monotonic() < until:
                started = time.monotonic()
                response = await http.post("/predict", files={"image": ("bug.jpg", image, "image/jpeg")})
                stored = response.status_code == 200 and response.json()["prediction_id"] is not None
                answers.append((started, response.status_code, stored, time.monotonic() - started))

    await asyncio.gather(*(client() for _ in range(clients)))
    return answers


def test_predictions_answer_through_a_hanging_database_and_an_s3_outage(bento, tiny_dataset):
    """Under 8 clients: PostgreSQL frozen with SIGSTOP for 15 s (its sockets stay open: every
    query hangs instead of failing), then, 20 s later, S3 stopped for 15 s. Every prediction is a 200, those
    during an outage are answered unstored, and storage resumes by itself after each."""
    server, stores, labeler = bento
    image = (tiny_dataset / "images" / next((tiny_dataset / "images").iterdir()).name).read_bytes()
    marks = {}

    def outages() -> None:
        time.sleep(5)
        frozen = stores.postgres_processes()
        for process in frozen:
            process.suspend()
        marks["hang"] = time.monotonic()
        marks["hang health"] = storage_health(server, within_s=20)
        time.sleep(max(0.0, 15 - (time.monotonic() - marks["hang"])))
        for process in frozen:
            process.resume()
        marks["thawed"] = time.monotonic()
        time.sleep(20)
        stores.s3.stop()
        marks["s3 down"] = time.monotonic()
        marks["s3 health"] = storage_health(server, within_s=20)
        time.sleep(max(0.0, 15 - (time.monotonic() - marks["s3 down"])))
        stores.s3.start()
        marks["s3 up"] = time.monotonic()

    async def run() -> list[tuple]:
        until = time.monotonic() + 78
        answers, _ = await asyncio.gather(predictions(server, labeler, image, until), asyncio.to_thread(outages))
        return answers

    answers = asyncio.run(run())
    assert {status for _, status, _, _ in answers} == {200}
    assert marks["hang health"] == {"database": "down", "images": "up"}
    assert marks["s3 health"] == {"database": "up", "images": "down"}
    retry_s = get_settings().serve.storage_retry_s
    for start, end in (("hang", "thawed"), ("s3 down", "s3 up")):
        # those in flight when the outage began wait for the storage timeout; the rest skip storage
        wait_s = 2 * get_settings().feedback.storage_timeout_s
        during = [a for a in answers if marks[start] + wait_s < a[0] and a[0] + a[3] < marks[end]]
        assert len(during) > 100 and not any(stored for _, _, stored, _ in during), start
        assert max(latency for *_, latency in during) < 1.0, start
        # the monitor finds the store up within a probe's timeout and its interval
        back = marks[end] + retry_s + get_settings().feedback.storage_timeout_s + 2
        after = [a for a in answers if back < a[0] < back + 6]
        assert after and all(stored for _, _, stored, _ in after), f"storage did not resume after {start}"


def test_the_bento_starts_with_postgresql_s3_and_mlflow_all_down_and_is_ready_soon_after_their_return(
    tmp_path, tiny_dataset, stores
):
    """A restart during an outage must not become a full outage: the Bento answers /livez while
    every store is down, and serves the champion soon after their return (about 6 s on an idle
    2-core machine; the bound leaves room for a loaded CI machine and still fails on MLflow's
    default client retries, 7 of up to 120 s, or a watcher that gives up)."""
    mlflow_server = MlflowServer(tmp_path / "mlflow").start()
    env = bento_env(tmp_path, free_port(), stores.database_url, stores.s3.url, stores.bucket)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**env, "MLFLOW_TRACKING_URI": mlflow_server.url}.items():
            mp.setenv(key, value)
        get_settings.cache_clear()
        register_tiny_model(read_classes(tiny_dataset), seed=0)
        client = {"Authorization": f"Bearer {keys.create_key(db.engine(get_settings()), name='client', role='client')}"}
        mlflow_server.stop()
        postgres.stop(stores.cluster)
        stores.s3.stop()
        server = BentoServer(int(env["INSECT_SERVE__PORT"]), tmp_path / "bento.log").start()
        try:
            server.wait_ready(timeout_s=120, probe="/livez")
            time.sleep(5)  # the watcher and the storage monitor have tried and failed
            assert httpx.get(f"{server.base}/readyz", timeout=5).status_code == 503
            assert httpx.get(f"{server.base}/health/storage", timeout=5).json() == {"database": "down", "images": "down"}
            stores.start_database()
            stores.s3.start()
            mlflow_server.start()
            returned = time.monotonic()
            server.wait_ready(timeout_s=30)
            ready_s = time.monotonic() - returned
            assert ready_s < 30, f"ready {ready_s:.1f} s after the stores returned"
            deadline = time.monotonic() + 20
            while not (answer := _predict(server, client, tiny_dataset))["prediction_id"]:  # stored once storage is back
                assert time.monotonic() < deadline, answer
                time.sleep(1)
            assert answer["model"]["version"] == "1"
            print(f"ready {ready_s:.1f} s after PostgreSQL, S3 and MLflow returned")
        finally:
            server.stop()
            mlflow_server.stop()
            get_settings.cache_clear()


def _predict(server: BentoServer, headers: dict, dataset: Path) -> dict:
    image = (dataset / "images" / next((dataset / "images").iterdir()).name).read_bytes()
    files = {"image": ("bug.jpg", image, "image/jpeg")}
    response = httpx.post(f"{server.base}/predict", files=files, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


class MlflowServer:
    """`mlflow server` on a port of its own, its runs and artifacts under `root`: stopped and
    started again, it serves what it had."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"]
        command += ["--artifacts-destination", str(self.root / "artifacts")]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not _answers(f"{self.url}/health"):
            assert self.process.poll() is None and time.monotonic() < deadline, "the MLflow server did not start"
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
