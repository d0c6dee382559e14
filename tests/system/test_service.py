"""The Bento HTTP server, started for real (`bentoml serve`), on a real PostgreSQL and S3 API."""

import asyncio
import http.server
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import boto3
import httpx
import psutil
import pytest
import sqlalchemy as sa
from mlflow import MlflowClient
from PIL import Image

from benchmarks.fixtures import BentoServer, register_tiny_model
from bentos import guards
from config import REPO_ROOT, get_settings
from feedback import db, keys
from feedback.db import feedback as feedback_table
from feedback.images import image_store
from ml.data import read_classes, read_split
from registry import SIGNATURE_TAG, promote
from tests.support import bento_env, free_port
from tests.system.hostile_uploads import EXPECTED, hostile_uploads

BUCKET = "insect-feedback-test"
MAX_IMAGE_BYTES = 100_000
CLIENT_RATE = 60  # requests per minute and client key


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dataset, postgres_url, s3_endpoint):
    """The service on a fresh port, serving v1 of a registry in a temp dir."""
    data_dir = tmp_path_factory.mktemp("service")
    port = free_port()
    env = bento_env(
        data_dir,
        port,
        postgres_url,
        s3_endpoint,
        BUCKET,
        INSECT_FEEDBACK__MAX_IMAGE_BYTES=str(MAX_IMAGE_BYTES),
        INSECT_SERVE__RATE_LIMITS=json.dumps(
            {"client": f"{CLIENT_RATE}/minute", "labeler": "100000/minute", "admin": "100000/minute"}
        ),
    )
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        get_settings.cache_clear()
        classes = read_classes(tiny_dataset)
        register_tiny_model(classes, seed=0)
        image_store(get_settings())  # the bucket, made as a deploy makes it: the service creates none
        suffix = os.urandom(4).hex()
        bearer = {
            role: {"Authorization": f"Bearer {keys.create_key(db.engine(get_settings()), name=f'{role}-{suffix}', role=role)}"}
            for role in keys.ROLES
        }
        bento = BentoServer(port, data_dir / "bento.log").start()
        try:
            bento.wait_ready()
            yield {
                "base": bento.base,
                "classes": classes,
                "dataset": tiny_dataset,
                "pid": bento.process.pid,
                "suffix": suffix,
                "log": bento.log,
                **bearer,
            }
        finally:
            bento.stop()
            get_settings.cache_clear()


def _jpeg(dataset: Path, index: int = 0) -> bytes:
    name, _ = read_split(dataset, "test")[index]
    return (dataset / "images" / name).read_bytes()


def _feedback_rows(where) -> int:
    engine = db.engine(get_settings())
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(feedback_table).where(where)).scalar_one()


def test_predict_returns_a_known_species(server):
    response = httpx.post(
        f"{server['base']}/predict",
        files={"image": ("bug.jpg", _jpeg(server["dataset"]), "image/jpeg")},
        data={"top_k": "2"},
        headers=server["client"],
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
        headers=server["labeler"],
        timeout=30,
    )
    assert response.status_code == 200, response.text
    receipt = response.json()
    assert _feedback_rows(feedback_table.c.id == receipt["feedback_id"]) == 1
    key = receipt["image_location"].removeprefix(f"s3://{BUCKET}/")
    s3 = boto3.client("s3", endpoint_url=get_settings().feedback.s3_endpoint_url)
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == image


def test_a_retry_with_an_idempotency_key_gets_the_first_answer_and_stores_nothing_new(server):
    """A client that lost the answer retries: with its key the retry, however many at once, is one row."""
    image, classes = _jpeg(server["dataset"], 2), server["classes"]

    def post(key: str, corrected: str = classes[1], image: bytes = image) -> httpx.Response:
        return httpx.post(
            f"{server['base']}/feedback",
            files={"image": ("bug.jpg", image, "image/jpeg")},
            data={"predicted_label": classes[0], "corrected_label": corrected},
            headers={**server["labeler"], "Idempotency-Key": key},
            timeout=60,
        )

    key = f"retry-{server['suffix']}"
    first = post(key).json()
    assert post(key, corrected=classes[2], image=_jpeg(server["dataset"], 3)).json() == first
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post(f"{key}-burst"), range(8)))
    assert all(a.status_code == 200 for a in answers) and len({a.json()["feedback_id"] for a in answers}) == 1
    assert _feedback_rows(feedback_table.c.idempotency_key.in_([key, f"{key}-burst"])) == 2
    assert post(f"{key}-other").json()["feedback_id"] not in {first["feedback_id"], answers[0].json()["feedback_id"]}
    too_long = post("k" * 201)
    assert too_long.status_code == 400 and "Idempotency-Key" in too_long.text


def test_feedback_on_an_earlier_prediction(server):
    predicted = httpx.post(
        f"{server['base']}/predict",
        files={"image": ("bug.jpg", _jpeg(server["dataset"], 2), "image/jpeg")},
        headers=server["client"],
        timeout=30,
    ).json()
    response = httpx.post(
        f"{server['base']}/feedback",
        data={"prediction_id": predicted["prediction_id"], "corrected_label": server["classes"][2]},
        headers=server["labeler"],
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert _feedback_rows(feedback_table.c.prediction_id == predicted["prediction_id"]) == 1


def test_200_concurrent_feedback_posts_land_exactly_once(server):
    image = _jpeg(server["dataset"], 3)
    labels = server["classes"]

    async def post_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server["base"], timeout=120, limits=limits, headers=server["labeler"]) as client:
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
    response = httpx.post(f"{server['base']}{route}", files=files, data=data, headers=server["labeler"], timeout=30)
    assert response.status_code == status, response.text
    assert response.text.strip() and "Traceback" not in response.text
    assert _feedback_rows(sa.true()) == before


def test_health_readiness_and_openapi(server):
    assert httpx.get(f"{server['base']}/livez").status_code == 200
    assert httpx.get(f"{server['base']}/readyz").status_code == 200
    document = httpx.get(f"{server['base']}/docs.json").json()
    assert {"/predict", "/feedback", "/model"} <= set(document["paths"])
    info = document["info"]  # this API's own, not BentoML's boilerplate
    assert info["title"] == "Insect classifier" and info["version"] == version("insect-mlops")
    assert "POST /predict" in info["description"] and "BentoML" not in info["description"]


def test_a_promoted_version_is_served_without_restart(server):
    version = register_tiny_model(server["classes"], seed=1, champion=False)
    promote(get_settings().registered_model_name, version)
    deadline = time.monotonic() + 60
    while httpx.post(f"{server['base']}/model", headers=server["client"]).json()["version"] != version:
        assert time.monotonic() < deadline, "the service did not pick up the new champion"
        time.sleep(0.5)
    predicted = httpx.post(
        f"{server['base']}/predict",
        files={"image": ("bug.jpg", _jpeg(server["dataset"]), "image/jpeg")},
        headers=server["client"],
        timeout=30,
    ).json()
    assert predicted["model"]["version"] == version


def test_a_champion_that_fails_to_load_is_logged_once_and_the_served_one_keeps_serving(server):
    """The watcher used to download a broken version again at every poll, logging each time."""
    name, before = get_settings().registered_model_name, _served(server)
    broken = register_tiny_model(server["classes"], seed=2, champion=False)
    MlflowClient().set_model_version_tag(name, broken, SIGNATURE_TAG, "0123456789abcdef:AAAA")  # no trusted key's
    promote(name, broken)
    try:
        time.sleep(8)  # 8 polls at INSECT_SERVE__RELOAD_INTERVAL_S=1: tries at about 1, 2, 4 and 8 s
        assert _served(server) == before
        log = server["log"].read_text()
        assert log.count(f"could not load {name} v{broken}") == 1 and "signed by key 0123456789abcdef" in log
    finally:
        promote(name, before)


def _served(server) -> str:
    return httpx.post(f"{server['base']}/model", headers=server["client"], timeout=30).json()["version"]


def test_a_storage_outage_is_a_503_and_predictions_skip_storage_for_a_while():
    from bentoml.exceptions import ServiceUnavailable

    from bentos.storage import StorageLane

    def refused():
        raise sa.exc.OperationalError("INSERT", {}, Exception("connection refused"))

    lane = StorageLane(threads=1, retry_s=60)
    assert lane.available
    with pytest.raises(ServiceUnavailable, match="retry later"):
        asyncio.run(lane(refused))
    assert not lane.available


def _stored() -> tuple[int, ...]:
    """Feedback rows, prediction rows and stored images: a refused request adds to none."""
    engine = db.engine(get_settings())
    with engine.connect() as conn:
        rows = [conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one() for t in (feedback_table, db.predictions)]
    s3 = boto3.client("s3", endpoint_url=get_settings().feedback.s3_endpoint_url)
    return (*rows, s3.list_objects_v2(Bucket=BUCKET).get("KeyCount", 0))


def _photo_post(server, route: str = "/predict", **kwargs) -> httpx.Response:
    files = {"image": ("bug.jpg", _jpeg(server["dataset"]), "image/jpeg")}
    data = {"predicted_label": server["classes"][0], "corrected_label": server["classes"][1]} if route == "/feedback" else {}
    return httpx.post(f"{server['base']}{route}", files=files, data=data, timeout=30, **kwargs)


@pytest.mark.parametrize("route", ["/predict", "/feedback", "/model"])
@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "send an API key"),
        ({"Authorization": "Bearer insect_made-up"}, "unknown or revoked"),
        ({"X-API-Key": "x"}, "unknown"),
    ],
    ids=["no key", "wrong bearer", "wrong x-api-key"],
)
def test_without_a_known_key_every_route_is_a_401_and_stores_nothing(server, route, headers, message):
    before = _stored()
    response = _photo_post(server, route, headers=headers)
    assert response.status_code == 401 and message in response.json()["error"]
    assert _stored() == before


def test_a_key_works_as_x_api_key_too_and_health_and_docs_need_none(server):
    key = server["client"]["Authorization"].removeprefix("Bearer ")
    assert _photo_post(server, headers={"X-API-Key": key}).status_code == 200
    for path in ("/livez", "/readyz", "/docs.json", "/schema.json"):
        assert httpx.get(f"{server['base']}{path}", timeout=10).status_code == 200, path
    storage = httpx.get(f"{server['base']}/health/storage", timeout=10)
    assert storage.status_code == 200 and storage.json() == {"database": "up", "images": "up"}  # nothing more


def _endpoint_labels(server) -> set[str]:
    """The `endpoint` labels of BentoML's request metrics on /metrics (an admin's)."""
    response = httpx.get(f"{server['base']}/metrics", headers=server["admin"], timeout=30)
    assert response.status_code == 200
    return set(re.findall(r'endpoint="([^"]*)"', response.text))


def test_metrics_are_an_admins_and_made_up_paths_add_no_label(server):
    for role in (None, "client", "labeler"):
        assert httpx.get(f"{server['base']}/metrics", headers=server.get(role, {}), timeout=10).status_code in (401, 403)

    async def made_up_paths() -> None:
        async with httpx.AsyncClient(base_url=server["base"], timeout=30, limits=httpx.Limits(max_connections=16)) as http:
            for start in range(0, 200, 50):  # refused as strangers' (after a delay): benchmarks.hostile sends 2,000
                await asyncio.gather(*(http.get(f"/no-such-route-{start + i}") for i in range(50)))
                await asyncio.gather(*(http.get(f"/app/no-such-page-{start + i}") for i in range(50)))

    asyncio.run(made_up_paths())
    labels = _endpoint_labels(server)
    assert {"other", "/app/*"} <= labels and not any("no-such" in label for label in labels), labels
    known = {"/predict", "/feedback", "/model", "/metrics", "/health/storage", "/static_content/*", "/app/*", "other"}
    assert all(label in known or label.startswith("/app") or label in guards.OPEN_PATHS for label in labels), labels
    assert len(labels) < 40  # a bound of its own, whatever the paths asked for


def test_the_front_door_takes_a_newcomer_to_sign_in_and_back_to_the_page_they_asked_for(server):
    with httpx.Client(base_url=server["base"], timeout=30, follow_redirects=True) as web:
        sign_in = web.get("/app/history")
        assert sign_in.url.path == "/app/sign-in" and sign_in.status_code == 200 and "API key" in sign_in.text
        token = re.search(r'name="csrf" value="([^"]+)"', sign_in.text).group(1)
        next_page = re.search(r'name="next" value="([^"]+)"', sign_in.text).group(1)
        key = server["client"]["Authorization"].removeprefix("Bearer ")
        landed = web.post("/app/sign-in", data={"api_key": key, "csrf": token, "next": next_page})
        assert landed.url.path == "/app/history" and landed.status_code == 200
        elsewhere = web.post("/app/sign-in", data={"api_key": key, "csrf": token, "next": "https://evil.example/"})
        assert elsewhere.url.host == "127.0.0.1"  # never to another site


def test_a_200_mb_form_to_sign_in_is_refused_before_it_is_read(server):
    def body():
        for _ in range(200):
            yield b"x" * 1_000_000

    started, before_rss = time.monotonic(), _server_rss(server["pid"])
    try:
        response = httpx.post(
            f"{server['base']}/app/sign-in",
            content=body(),
            headers={"Content-Type": "application/x-www-form-urlencoded", "Content-Length": "200000000"},
            timeout=60,
        )
        assert response.status_code == 413 and "over the limit" in response.json()["error"]
    except httpx.WriteError:
        pass  # answered and closed while the client was still sending: refused all the same
    assert time.monotonic() - started < 5  # 9.5 s when the form was parsed first
    assert _server_rss(server["pid"]) - before_rss < 20_000_000  # 200 MB never taken in


def test_a_route_that_is_not_public_is_a_404_even_for_an_admin(server):
    response = httpx.post(f"{server['base']}/classify", json={"images": [[[[0.0]]]]}, headers=server["admin"], timeout=10)
    assert response.status_code == 404 and "no route" in response.json()["error"]


def test_a_clients_correction_is_a_suggestion_and_a_labelers_trains(server):
    receipts = {role: _photo_post(server, "/feedback", headers=server[role]).json() for role in ("client", "labeler")}
    assert receipts["client"]["kind"] == "suggestion" and receipts["labeler"]["kind"] == "label"
    pending = {row.id for row in db.pending_feedback(db.engine(get_settings()))}
    assert receipts["labeler"]["feedback_id"] in pending and receipts["client"]["feedback_id"] not in pending
    assert _feedback_rows(feedback_table.c.submitted_by == f"client-{server['suffix']}") >= 1


def test_a_revoked_key_is_refused_within_seconds(server):
    engine = db.engine(get_settings())
    name = f"short-lived-{server['suffix']}"
    headers = {"Authorization": f"Bearer {keys.create_key(engine, name=name, role='client')}"}
    assert _photo_post(server, headers=headers).status_code == 200
    assert keys.revoke_key(engine, name)
    time.sleep(guards.KEY_CACHE_S + 1)
    assert _photo_post(server, headers=headers).status_code == 401


def _server_rss(pid: int) -> int:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


def test_a_50_mb_body_is_refused_before_it_is_read(server):
    before_rows, before_rss = _stored(), _server_rss(server["pid"])
    declared = httpx.post(f"{server['base']}/predict", content=b"x" * 50_000_000, headers=server["client"], timeout=60)
    assert declared.status_code == 413 and "over the limit" in declared.json()["error"]

    def chunks():  # no Content-Length: the limit acts while the body streams in
        for _ in range(50):
            yield b"\0" * 1_000_000

    try:
        streamed = httpx.post(f"{server['base']}/predict", content=chunks(), headers=server["client"], timeout=60)
        assert streamed.status_code == 413
    except httpx.WriteError:
        pass  # the server answered and closed while the client was still sending: refused all the same
    assert _stored() == before_rows
    assert _server_rss(server["pid"]) - before_rss < 20_000_000  # 50 MB never taken in


def test_a_text_value_where_the_image_belongs_is_a_400_and_is_never_fetched(server):
    fetched = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            fetched.append(self.path)
            self.send_response(200)
            self.end_headers()

    listener = http.server.HTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=listener.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{listener.server_port}/bug.jpg"
    try:
        for route, headers in (("/predict", server["client"]), ("/feedback", server["labeler"])):
            fields = {"image": url, "predicted_label": server["classes"][0], "corrected_label": server["classes"][0]}
            multipart, form, body = {"data": fields, "files": {"top_k": (None, "1")}}, {"data": fields}, {"json": fields}
            for encoding in (multipart, form, body):
                response = httpx.post(f"{server['base']}{route}", headers=headers, timeout=30, **encoding)
                assert response.status_code == 400 and "must be an uploaded file" in response.json()["error"], response.text
    finally:
        listener.shutdown()
    assert fetched == []


def test_the_service_listens_on_loopback_only(server):
    port = int(server["base"].rsplit(":", 1)[1])
    tree = psutil.Process(server["pid"])
    sockets = [c for p in [tree, *tree.children(recursive=True)] for c in p.net_connections("tcp") if c.status == "LISTEN"]
    assert {c.laddr.ip for c in sockets if c.laddr.port == port} == {"127.0.0.1"}


HOSTILE = hostile_uploads()


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_uploads_get_a_2xx_or_a_4xx_with_a_message_never_a_5xx(server, case):
    name, data, content_type = HOSTILE[case]
    labels = {"predicted_label": server["classes"][0], "corrected_label": server["classes"][1]}
    for route, headers, fields, expected in (
        ("/predict", server["client"], {}, EXPECTED[case][0]),
        ("/feedback", server["labeler"], labels, EXPECTED[case][1]),
    ):
        before = _stored()
        response = httpx.post(
            f"{server['base']}{route}", files={"image": (name, data, content_type)}, data=fields, headers=headers, timeout=60
        )
        assert response.status_code == expected, f"{route}: {response.status_code} {response.text}"
        if expected >= 400:
            assert response.text.strip() and "Traceback" not in response.text and _stored() == before


@pytest.mark.parametrize("route", ["/predict", "/feedback", "/model"])
@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b""),
        ("multipart/form-data; boundary=b0", b"--b0\r\n\xbb\xfa\xf1\xa2--b0--\r\n"),
    ],
    ids=["no boundary", "unparsable part"],
)
def test_a_malformed_form_is_a_400_not_a_500(server, route, content_type, body):
    """Found by the fuzzing below: BentoML answered both with a 500."""
    headers = {**server["admin"], "Content-Type": content_type}
    response = httpx.post(f"{server['base']}{route}", content=body, headers=headers, timeout=30)
    assert response.status_code == 400 and "malformed multipart" in response.json()["error"]


def test_feedback_on_a_prediction_of_an_untrainable_size_is_a_422(server):
    name, data, content_type = HOSTILE["huge aspect"]
    predicted = httpx.post(
        f"{server['base']}/predict", files={"image": (name, data, content_type)}, headers=server["client"], timeout=60
    ).json()
    before = _stored()
    response = httpx.post(
        f"{server['base']}/feedback",
        data={"prediction_id": predicted["prediction_id"], "corrected_label": server["classes"][0]},
        headers=server["labeler"],
        timeout=30,
    )
    assert response.status_code == 422 and "12000x2 px" in response.text
    assert _stored() == before


def test_a_key_over_its_rate_limit_gets_429_with_retry_after(server):
    engine = db.engine(get_settings())
    key = keys.create_key(engine, name=f"eager-{server['suffix']}", role="client")
    headers = {"Authorization": f"Bearer {key}"}
    answers = [httpx.post(f"{server['base']}/model", headers=headers, timeout=30) for _ in range(CLIENT_RATE + 1)]
    assert [a.status_code for a in answers] == [200] * CLIENT_RATE + [429]
    assert 1 <= int(answers[-1].headers["retry-after"]) <= 60 and "over its limit" in answers[-1].json()["error"]
    assert httpx.post(f"{server['base']}/model", headers=server["labeler"], timeout=30).status_code == 200  # per key


def test_bentomls_own_client_calls_with_a_token(server):
    import bentoml

    key = server["client"]["Authorization"].removeprefix("Bearer ")
    with bentoml.SyncHTTPClient(server["base"], token=key, timeout=30) as client:
        assert client.model()["classes"] == server["classes"]


def test_fuzzing_from_the_openapi_document_gets_no_server_error(server, tmp_path):
    """schemathesis generates requests for every operation in /docs.json, valid and invalid, sent
    with an admin key (from the environment, never from argv), and checks that none gets a 5xx."""
    config = tmp_path / "schemathesis.toml"
    config.write_text('headers = { Authorization = "Bearer ${INSECT_FUZZ_API_KEY}" }\n')
    schemathesis = str(Path(sys.executable).with_name("schemathesis"))
    command = [schemathesis, "--config-file", str(config), "--no-color", "run", f"{server['base']}/docs.json"]
    command += ["--url", server["base"], "--checks", "not_a_server_error", "--max-examples", "40", "--seed", "1"]
    key = server["admin"]["Authorization"].removeprefix("Bearer ")
    environment = {**os.environ, "INSECT_FUZZ_API_KEY": key}
    fuzzed = subprocess.run(command, env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert fuzzed.returncode == 0, fuzzed.stdout[-6000:]
    generated = re.search(r"Test cases:\s+(\d+) generated", fuzzed.stdout)
    assert generated and int(generated.group(1)) > 100, fuzzed.stdout[-3000:]
    assert key not in fuzzed.stdout
    print(f"schemathesis: {generated.group(1)} generated requests, 0 server errors")


def test_the_load_benchmark_drives_the_service_with_locust_and_reads_its_timings(server, tmp_path):
    """A smoke run of `python -m benchmarks.load`: 2 users for 3 s of the mixed profile."""
    from benchmarks.load import mean_phases_ms, phase_totals, run_locust
    from benchmarks.load_report import markdown

    (tmp_path / "key").write_text(server["admin"]["Authorization"].removeprefix("Bearer "))
    (tmp_path / "photos").mkdir()
    for index in range(3):
        (tmp_path / "photos" / f"{index}.jpg").write_bytes(_jpeg(server["dataset"], index))
    env = {**os.environ, "LOAD_API_KEY_FILE": str(tmp_path / "key"), "LOAD_IMAGES": str(tmp_path / "photos")}
    before = phase_totals(server["base"], server["admin"])
    result = run_locust(server["base"], 2, 3, "mixed", env, tmp_path)
    result |= {"config": "eager, batching", "phases_ms": mean_phases_ms(before, phase_totals(server["base"], server["admin"]))}
    assert result["requests"] > 10 and result["errors"] == 0, result
    assert all(result["phases_ms"][phase] > 0 for phase in ("upload_parse", "decode", "preprocess", "model", "database"))
    assert "| eager, batching | mixed | 2 |" in markdown([result], MlflowClient().get_model_version("insect-classifier", "1"), 3)


WEB_ARTIFACTS = REPO_ROOT / "test-artifacts" / "web"  # screenshots at phone and desktop width, kept by CI


def _screenshots(browser, name: str) -> None:
    WEB_ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for width, height, device in ((360, 780, "phone"), (1280, 900, "desktop")):
        browser.set_window_size(width, height)
        browser.save_screenshot(str(WEB_ARTIFACTS / f"{name}-{device}.png"))


def _shown(browser, by: str, value: str):
    """The element once the page that has it is shown (a click's navigation takes a moment)."""
    from selenium.webdriver.support import expected_conditions as shown
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, 30).until(shown.presence_of_element_located((by, value)))


def _replaced(browser, element) -> None:
    """Once a click's navigation has replaced the page that had `element`."""
    from selenium.webdriver.support import expected_conditions as shown
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(shown.staleness_of(element))


def _sign_in(browser, server, role: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{server['base']}/app/")
    assert browser.current_url.endswith("/app/sign-in?next=/app/")  # the front door: the sign-in form
    browser.find_element(By.ID, "api_key").send_keys(server[role]["Authorization"].removeprefix("Bearer "))
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    _shown(browser, By.ID, "image")


def test_a_client_signs_in_identifies_a_photo_and_suggests_the_right_species(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(f"{server['base']}/app/sign-in")
    browser.find_element(By.ID, "api_key").send_keys("insect_made-up")
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    assert "unknown or revoked" in _shown(browser, By.CLASS_NAME, "error").text
    _screenshots(browser, "sign-in")

    with db.engine(get_settings()).begin() as conn:
        conn.execute(feedback_table.delete())  # the review queue then holds only this test's suggestion
    _sign_in(browser, server, "client")
    photo = tmp_path / "bug.jpg"
    photo.write_bytes(_jpeg(server["dataset"], 4))
    browser.find_element(By.ID, "image").send_keys(str(photo))
    browser.find_element(By.CSS_SELECTOR, "form.upload button").click()
    answer = _shown(browser, By.ID, "answer-heading").text
    assert answer in server["classes"]
    served = httpx.post(f"{server['base']}/model", headers=server["admin"], timeout=30).json()["version"]
    assert f"version {served} " in browser.find_element(By.CLASS_NAME, "model").text
    assert len(browser.find_elements(By.CSS_SELECTOR, ".scores li")) == len(server["classes"])  # top 5 of 4
    _screenshots(browser, "identify")

    right = next(name for name in server["classes"] if name != answer)
    browser.find_element(By.TAG_NAME, "summary").click()
    browser.find_element(By.ID, "species").send_keys(right)
    browser.find_element(By.CSS_SELECTOR, "details form button").click()
    assert "an expert will check it" in _shown(browser, By.ID, "what-next").text
    browser.get(f"{server['base']}/app/history")
    row = browser.find_element(By.CSS_SELECTOR, "tbody tr").text
    assert right in row and "suggested, waiting for an expert" in row
    _screenshots(browser, "history")
    assert _feedback_rows(feedback_table.c.corrected_label == right) >= 1

    # an expert signs in and finds that suggestion first in the review queue, and confirms it
    browser.find_element(By.CSS_SELECTOR, "form.sign-out button").click()
    _shown(browser, By.ID, "api_key")
    _sign_in(browser, server, "labeler")
    browser.get(f"{server['base']}/app/review")
    assert _shown(browser, By.ID, "item-heading").text == f"A user says: {right}"
    assert len(browser.find_elements(By.CSS_SELECTOR, ".scores li")) == len(server["classes"])  # the model's top 5 (of 4)
    assert browser.execute_script("return document.querySelector('img.photo').naturalWidth") > 0  # the image shows
    _screenshots(browser, "review")
    confirm = browser.find_element(By.ID, "confirm")
    confirm.click()
    _replaced(browser, confirm)  # the next item's page: the confirmation is stored (both pages show progress)
    labels = [row for row in db.pending_feedback(db.engine(get_settings())) if row.submitted_by == f"labeler-{server['suffix']}"]
    assert any(row.corrected_label == right and row.prediction_id for row in labels)  # the ingest takes it: it trains


def test_an_admin_promotes_a_version_on_the_models_page_and_the_identify_page_answers_with_it(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    version = register_tiny_model(server["classes"], seed=11, champion=False)
    _sign_in(browser, server, "labeler")
    browser.get(f"{server['base']}/app/models")
    assert _shown(browser, By.ID, f"v{version}") and not browser.find_elements(By.ID, f"promote-{version}")  # read only
    browser.find_element(By.CSS_SELECTOR, "form.sign-out button").click()
    _shown(browser, By.ID, "api_key")

    _sign_in(browser, server, "admin")
    browser.get(f"{server['base']}/app/models")
    _screenshots(browser, "models")
    browser.find_element(By.ID, f"sure-{version}").click()
    browser.find_element(By.ID, f"promote-{version}").click()
    assert f"Version {version} is now champion" in _shown(browser, By.ID, "changed").text
    assert "champion" in browser.find_element(By.ID, f"v{version}").text

    photo = tmp_path / "bug.jpg"
    photo.write_bytes(_jpeg(server["dataset"], 5))
    deadline = time.monotonic() + 60
    while True:  # the service follows the alias within its poll interval
        browser.get(f"{server['base']}/app/")
        browser.find_element(By.ID, "image").send_keys(str(photo))
        browser.find_element(By.CSS_SELECTOR, "form.upload button").click()
        _shown(browser, By.ID, "answer-heading")
        if f"version {version} " in browser.find_element(By.CLASS_NAME, "model").text:
            break
        assert time.monotonic() < deadline, "the identify page never answered with the promoted version"
        time.sleep(1)


def test_promoting_needs_an_admin_a_confirmation_and_a_token(server):
    with httpx.Client(base_url=f"{server['base']}/app", timeout=30) as web:
        token = re.search(r'name="csrf" value="([^"]+)"', web.get("/sign-in").text).group(1)
        web.post("/sign-in", data={"api_key": server["labeler"]["Authorization"].removeprefix("Bearer "), "csrf": token})
        token = re.search(r'name="csrf" value="([^"]+)"', web.get("/models").text).group(1)
        refused = web.post("/models/promote", data={"version": "1", "sure": "true", "csrf": token})
        assert refused.status_code == 403 and "admin" in refused.text  # a labeler reads, only an admin acts
    with httpx.Client(base_url=f"{server['base']}/app", timeout=30) as web:
        token = re.search(r'name="csrf" value="([^"]+)"', web.get("/sign-in").text).group(1)
        web.post("/sign-in", data={"api_key": server["admin"]["Authorization"].removeprefix("Bearer "), "csrf": token})
        token = re.search(r'name="csrf" value="([^"]+)"', web.get("/models").text).group(1)
        assert web.post("/models/promote", data={"version": "1", "csrf": token}).status_code == 400  # not confirmed
        assert web.post("/models/promote", data={"version": "1", "sure": "true"}).status_code == 403  # no token
        assert web.post("/models/promote", data={"version": "999", "sure": "true", "csrf": token}).status_code == 404


def test_a_client_may_not_open_the_review_queue_or_the_models_page(server):
    with httpx.Client(base_url=f"{server['base']}/app", timeout=30) as web:
        token = re.search(r'name="csrf" value="([^"]+)"', web.get("/sign-in").text).group(1)
        key = server["client"]["Authorization"].removeprefix("Bearer ")
        web.post("/sign-in", data={"api_key": key, "csrf": token})
        for page in ("/review", "/models"):
            refused = web.get(page)
            assert refused.status_code == 403 and "for a labeler key" in refused.text
        assert web.get("/review/image", params={"item": "s:1"}).status_code == 403


def test_the_web_app_refuses_a_form_without_its_csrf_token_and_bad_uploads_as_the_api_does(server):
    with httpx.Client(base_url=f"{server['base']}/app", timeout=30) as web:
        token = re.search(r'name="csrf" value="([^"]+)"', web.get("/sign-in").text).group(1)
        key = server["client"]["Authorization"].removeprefix("Bearer ")
        assert web.post("/sign-in", data={"api_key": key}).status_code == 403  # no token
        assert web.post("/sign-in", data={"api_key": key, "csrf": token}).status_code == 303
        token = re.search(r'name="csrf" value="([^"]+)"', web.get("/").text).group(1)  # a new session, a new token
        photo = {"image": ("bug.jpg", _jpeg(server["dataset"]), "image/jpeg")}
        refused = web.post("/identify", files=photo)
        assert refused.status_code == 403 and "did not come from this site" in refused.text
        nested = web.post("/identify", content=b"[" * 5000 + b"]" * 5000, headers={"Content-Type": "application/json"})
        assert nested.status_code == 400 and "malformed JSON" in nested.text
        assert web.post("/identify", files=photo, data={"csrf": token}).status_code == 200
        for case in ("text", "bomb png", "empty"):
            name, data, content_type = HOSTILE[case]
            answer = web.post("/identify", files={"image": (name, data, content_type)}, data={"csrf": token})
            assert answer.status_code == EXPECTED[case][0] and "That did not work" in answer.text, case
