"""The Bento HTTP server, started for real (`bentoml serve`), on a real PostgreSQL and S3 API."""

import asyncio
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import httpx
import pytest
import sqlalchemy as sa
from PIL import Image

from config import REPO_ROOT, get_settings
from feedback.db import feedback as feedback_table
from ml.data import read_classes, read_split
from registry import promote
from tests.support import TINY_ENV, free_port, register_tiny_model

BUCKET = "insect-feedback-test"
MAX_IMAGE_BYTES = 100_000


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dataset, postgres_url, s3_endpoint):
    """The service on a fresh port, serving v1 of a registry in a temp dir."""
    data_dir = tmp_path_factory.mktemp("service")
    port = free_port()
    env = {
        **TINY_ENV,
        "INSECT_DATA_DIR": str(data_dir),
        "MLFLOW_TRACKING_URI": f"sqlite:///{data_dir / 'mlflow.db'}",
        "INSECT_FEEDBACK__DATABASE_URL": postgres_url,
        "INSECT_FEEDBACK__S3_BUCKET": BUCKET,
        "INSECT_FEEDBACK__S3_ENDPOINT_URL": s3_endpoint,
        "INSECT_FEEDBACK__MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
        "INSECT_SERVE__RELOAD_INTERVAL_S": "1",
        "INSECT_SERVE__PORT": str(port),
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        get_settings.cache_clear()
        classes = read_classes(tiny_dataset)
        register_tiny_model(classes, seed=0)
        with open(data_dir / "bento.log", "w") as log:
            process = subprocess.Popen(
                [str(Path(sys.executable).with_name("bentoml")), "serve", "bentos.service:InsectClassifier", "--port", str(port)],
                cwd=REPO_ROOT,
                env={**os.environ},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(base, process, data_dir / "bento.log")
            yield {"base": base, "classes": classes, "dataset": tiny_dataset}
        finally:
            process.terminate()
            process.wait(30)
            get_settings.cache_clear()


def _wait_ready(base: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-4000:]
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise TimeoutError(log.read_text()[-4000:])


def _jpeg(dataset: Path, index: int = 0) -> bytes:
    name, _ = read_split(dataset, "test")[index]
    return (dataset / "images" / name).read_bytes()


def _feedback_rows(where) -> int:
    engine = sa.create_engine(get_settings().feedback.database_url)
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(feedback_table).where(where)).scalar_one()


def test_predict_returns_a_known_species(server):
    response = httpx.post(
        f"{server['base']}/predict",
        files={"image": ("bug.jpg", _jpeg(server["dataset"]), "image/jpeg")},
        data={"top_k": "2"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["species"] in server["classes"] and len(body["top_k"]) == 2
    assert body["top_k"][0]["probability"] >= body["top_k"][1]["probability"]
    assert body["model"]["version"] == "1" and body["model"]["backend"] == "torch-eager"
    assert body["prediction_id"]


def test_feedback_lands_as_a_row_and_an_object(server):
    image = _jpeg(server["dataset"], 1)
    response = httpx.post(
        f"{server['base']}/feedback",
        files={"image": ("bug.jpg", image, "image/jpeg")},
        data={"predicted_label": server["classes"][0], "corrected_label": server["classes"][1], "user_id": "ann"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    receipt = response.json()
    assert _feedback_rows(feedback_table.c.id == receipt["feedback_id"]) == 1
    key = receipt["image_location"].removeprefix(f"s3://{BUCKET}/")
    s3 = boto3.client("s3", endpoint_url=get_settings().feedback.s3_endpoint_url)
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == image


def test_feedback_on_an_earlier_prediction(server):
    predicted = httpx.post(
        f"{server['base']}/predict", files={"image": ("bug.jpg", _jpeg(server["dataset"], 2), "image/jpeg")}, timeout=30
    ).json()
    response = httpx.post(
        f"{server['base']}/feedback",
        data={"prediction_id": predicted["prediction_id"], "corrected_label": server["classes"][2]},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert _feedback_rows(feedback_table.c.prediction_id == predicted["prediction_id"]) == 1


def test_200_concurrent_feedback_posts_land_exactly_once(server):
    image = _jpeg(server["dataset"], 3)
    labels = server["classes"]

    async def post_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server["base"], timeout=120, limits=httpx.Limits(max_connections=200)) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/feedback",
                        files={"image": ("bug.jpg", image, "image/jpeg")},
                        data={"predicted_label": labels[0], "corrected_label": labels[1], "user_id": f"load-{i}"},
                    )
                    for i in range(200)
                )
            )

    responses = asyncio.run(post_all())
    assert [r.status_code for r in responses] == [200] * 200
    assert len({r.json()["feedback_id"] for r in responses}) == 200
    assert _feedback_rows(feedback_table.c.user_id.like("load-%")) == 200


def _png(size: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(out, format="PNG")
    return out.getvalue()


def _gif() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32)).save(out, format="GIF")
    return out.getvalue()


BAD_REQUESTS = {
    "not an image": ("/predict", {"image": ("a.jpg", b"just some text", "image/jpeg")}, {}, 415),
    "a GIF": ("/predict", {"image": ("a.gif", _gif(), "image/gif")}, {}, 415),
    "empty upload": ("/predict", {"image": ("a.jpg", b"", "image/jpeg")}, {}, 400),
    "too large": ("/predict", {"image": ("a.png", os.urandom(MAX_IMAGE_BYTES + 1), "image/png")}, {}, 413),
    "no image field": ("/predict", None, {"top_k": "3"}, 400),
    "top_k not a number": ("/predict", {"image": ("a.png", _png(40), "image/png")}, {"top_k": "many"}, 400),
    "unknown label": (
        "/feedback",
        {"image": ("a.png", _png(40), "image/png")},
        {"predicted_label": "x", "corrected_label": "dragon"},
        422,
    ),
    "no corrected label": ("/feedback", {"image": ("a.png", _png(40), "image/png")}, {"predicted_label": "x"}, 400),
    "unknown prediction id": ("/feedback", None, {"prediction_id": "nope", "corrected_label": "{0}"}, 404),
    "neither image nor prediction": ("/feedback", None, {"corrected_label": "{0}"}, 400),
    "image without predicted label": ("/feedback", {"image": ("a.png", _png(40), "image/png")}, {"corrected_label": "{0}"}, 400),
    "feedback image not an image": (
        "/feedback",
        {"image": ("a.jpg", b"\xff\xd8 broken", "image/jpeg")},
        {"predicted_label": "{0}", "corrected_label": "{0}"},
        415,
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_with_a_message_and_stores_nothing(server, case):
    route, files, data, status = BAD_REQUESTS[case]
    data = {k: v.format(server["classes"][0]) for k, v in data.items()}
    before = _feedback_rows(sa.true())
    response = httpx.post(f"{server['base']}{route}", files=files, data=data, timeout=30)
    assert response.status_code == status, response.text
    assert response.text.strip() and "Traceback" not in response.text
    assert _feedback_rows(sa.true()) == before


def test_health_readiness_and_openapi(server):
    assert httpx.get(f"{server['base']}/livez").status_code == 200
    assert httpx.get(f"{server['base']}/readyz").status_code == 200
    paths = httpx.get(f"{server['base']}/docs.json").json()["paths"]
    assert {"/predict", "/feedback", "/model"} <= set(paths)


def test_a_promoted_version_is_served_without_restart(server):
    version = register_tiny_model(server["classes"], seed=1, champion=False)
    promote(get_settings().registered_model_name, version)
    deadline = time.monotonic() + 60
    while httpx.post(f"{server['base']}/model").json()["version"] != version:
        assert time.monotonic() < deadline, "the service did not pick up the new champion"
        time.sleep(0.5)
    predicted = httpx.post(
        f"{server['base']}/predict", files={"image": ("bug.jpg", _jpeg(server["dataset"]), "image/jpeg")}, timeout=30
    ).json()
    assert predicted["model"]["version"] == version


def test_a_storage_outage_is_a_503_not_a_500():
    from bentoml.exceptions import ServiceUnavailable

    from bentos.service import storage_unavailable_as_503

    with pytest.raises(ServiceUnavailable, match="retry later"), storage_unavailable_as_503():
        raise sa.exc.OperationalError("INSERT", {}, Exception("connection refused"))
