"""The insect classifier as an HTTP API (BentoML 1.4).

    POST /predict    an image (JPEG/PNG) -> top-k species, with the model version that answered
    POST /feedback   a corrected label for an image or an earlier prediction -> a feedback id
    POST /model      what is being served
    GET  /health/storage   whether the database and the image store were up at their last probe
    /livez, /readyz, /metrics (an admin's), /docs.json: BentoML's own

The model is the registry's `champion`, its signature and files checked before use (registry/), and
swapped in place when the alias moves. The service starts without its stores: it is live at
once, ready when the champion has loaded, and stores feedback whenever its stores answer.
Predictions are batched across requests (`batching.py`);
feedback rows go to PostgreSQL and images to S3 (or local files), see `feedback/`, through
storage threads of their own (`storage.py`). /metrics has where a request's time goes
(`insect_request_phase_seconds`).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache, partial
from importlib.metadata import version
from pathlib import Path

import bentoml
from bentoml.exceptions import InvalidArgument, NotFound, ServiceUnavailable, UnprocessableEntity
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, Field

from bentos import web
from bentos.batching import Batched, Batcher
from bentos.guards import OPEN_PATHS, Admission, ApiKeys, BodyLimits
from bentos.images import FORMATS, check_trainable_size, decode, decodes_inline, open_image
from bentos.patches import describe_openapi, disarm_answered_timers, label_metrics_by_route
from bentos.storage import StorageLane
from config import get_settings
from feedback import db
from feedback.images import image_key, image_store
from feedback.keys import Caller, caller_for_digest

with bentoml.importing():  # the serving runtime's own: `bentoml build` imports this module without them
    import mlflow
    import numpy as np
    import psutil
    import sqlalchemy as sa

    from registry import ServedModel, load_verified, version_by_alias
    from registry.pyfunc import preprocess

logger = logging.getLogger("bentoml.insect")
settings = get_settings()
MAX_RELOAD_DELAY_S = 3600.0  # the longest wait before a version that failed to load is tried again
MAX_IDEMPOTENCY_KEY = 200  # characters of a client's Idempotency-Key header
FORM_OVERHEAD_BYTES = 64 * 1024  # a request may carry this much besides the image: fields, part headers
PHASES = bentoml.metrics.Histogram(
    name="insect_request_phase_seconds",
    documentation="Where a request's time goes: upload_parse (from the door to the handler: body, form, "
    "temp file), decode, preprocess, queue (waiting for the model), model (its batch's run), image_store, database",
    labelnames=["route", "phase"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)


class SpeciesScore(BaseModel):
    species: str
    probability: float


class ModelInfo(BaseModel):
    name: str
    version: str
    backend: str = Field(description="tvm-cuda or tvm-llvm when a TVM build for this GPU or CPU was registered, else torch-eager")


class PredictionResponse(BaseModel):
    prediction_id: str | None = Field(
        description="pass it to /feedback to correct this prediction; null when the prediction could not be "
        "stored (feedback storage down): the species are right, send the image itself to /feedback"
    )
    species: str
    probability: float
    top_k: list[SpeciesScore]
    model: ModelInfo


class FeedbackReceipt(BaseModel):
    feedback_id: int
    image_location: str
    kind: str = Field(description="label (trains the next model) or suggestion (waits for a labeler)")


@contextmanager
def timed(route: str, phase: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        PHASES.labels(route=route, phase=phase).observe(time.perf_counter() - started)


def share_cores() -> None:
    """Give this worker's model (TVM's pool, torch's intra-op threads) its share of the physical
    cores, less one for the request path (`serve.model_threads`): threads fighting over the same
    cores stall the model at every kernel's barrier."""
    import torch

    threads = settings.serve.threads_per_model(psutil.cpu_count(logical=False) or 1)
    os.environ.setdefault("TVM_NUM_THREADS", str(threads))  # read when TVM's pool starts, at the first run
    torch.set_num_threads(threads)


def shorten_lock_turns() -> None:
    """Hand the interpreter lock over sooner (`serve.gil_switch_interval_ms`): this process's
    threads mostly want it back for moments, after the model, a database round trip or a decode,
    while the event loop would otherwise keep it for Python's default 5 ms."""
    sys.setswitchinterval(settings.serve.gil_switch_interval_ms / 1000)


def settle_heap() -> None:
    """Take what is alive now (the imports, the served model) out of the garbage collector's
    walks. A full collection walks every tracked object with every thread stopped: with ~530k of
    them it stopped a worker under load for 0.4-0.5 s (the tail of /predict's latency). Garbage,
    the previous model's included, is collected first, never kept."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def softmax(logits: np.ndarray) -> np.ndarray:
    exps = np.exp(logits - logits.max())
    return exps / exps.sum()


def bound_registry_calls() -> None:
    """Every MLflow call of this process gives up after `serve.registry_timeout_s`, retried once
    (the client's defaults: 120 s and 7 retries, on threads other requests need)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(settings.serve.registry_timeout_s))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")


@cache
def feedback_db() -> sa.Engine:
    """The feedback database's pooled engine, one per worker: the service's and its key checks'
    (it connects at its first use: the service starts while the database is down)."""
    return db.engine(settings)


disarm_answered_timers()
health = FastAPI(title="Insect classifier health", docs_url=None, redoc_url=None, openapi_url=None)
web_app = web.build_app()


@bentoml.asgi_app(web_app, path=web.PREFIX)
@bentoml.asgi_app(health, path="/health")
@bentoml.service(
    name="insect_classifier",
    workers=settings.serve.workers,
    threads=8,
    traffic={"timeout": 60},  # how many requests may wait is bounded at the door: guards.Admission
    http={"port": settings.serve.port, "host": settings.serve.host},
)
class InsectClassifier:
    def __init__(self) -> None:
        # nothing here waits for a store: the alias watcher loads the model, the storage
        # monitor finds out when the database and the image store answer
        bound_registry_calls()
        mlflow.set_tracking_uri(settings.tracking_uri)
        share_cores()
        shorten_lock_turns()
        self.name = settings.registered_model_name
        self.served: ServedModel | None = None
        self.db = feedback_db()
        self.images = image_store(settings, create_bucket=False)
        serve = settings.serve
        checks = {"database": lambda: db.ping(self.db), "images": self.images.check}
        self.storage = StorageLane(serve.storage_threads, serve.storage_retry_s, settings.feedback.storage_timeout_s, checks)
        self.batcher = Batcher(self._run_batch, serve.max_batch_size)
        web.attach(web_app, settings, self)
        threading.Thread(target=self._watch_alias, name="alias-watcher", daemon=True).start()

    def _reload(self) -> None:
        """Serve the version the alias points at now, if it is not served already."""
        current = version_by_alias(self.name, settings.serve.alias)
        if current is None or (self.served and self.served.version == str(current.version)):
            return
        self.served = load_verified(settings, settings.serve.alias, settings.serve.backend)
        settle_heap()
        logger.info("serving %s v%s (%s)", self.name, self.served.version, self.served.backend)

    def _watch_alias(self) -> None:
        """Follow the alias, from the start. A version that fails to load leaves the served one
        serving, is logged once, and is tried again only after a delay that doubles each time (up
        to an hour), instead of being downloaded again at every poll. Until a version is served,
        the registry is asked every second: the service is ready soon after the registry returns."""
        retry = {}  # version that failed -> (when to try it again, the delay after that)
        while True:
            version = None  # unknown while the registry does not answer
            try:
                current = version_by_alias(self.name, settings.serve.alias)
                version = None if current is None else str(current.version)
                if version and time.monotonic() >= retry.get(version, (0.0,))[0]:
                    self._reload()
            except Exception:  # a bad new version must not take the served one down
                if version not in retry:
                    logger.exception(
                        "could not load %s v%s; still serving the previous one, trying it again with growing delays",
                        self.name,
                        version,
                    )
                delay = retry.get(version, (0.0, settings.serve.reload_interval_s))[1]
                retry[version] = (time.monotonic() + delay, min(2 * delay, MAX_RELOAD_DELAY_S))
            interval = settings.serve.reload_interval_s
            threading.Event().wait(interval if self.served else min(1.0, interval))

    def __is_ready__(self) -> bool:
        return self.served is not None

    def _model(self) -> ServedModel:
        if self.served is None:
            raise ServiceUnavailable(f"no {self.name!r} version has alias {settings.serve.alias!r} yet")
        return self.served

    def _run_batch(self, images: np.ndarray) -> tuple[np.ndarray, ServedModel]:
        """Logits for a batch of preprocessed images (float32 NCHW in [0, 1]), and the version
        that produced them: one version for the whole batch, even when the alias moves."""
        served = self._model()
        return served.predict(images), served

    @bentoml.api(route="/predict")
    async def predict(
        self, image: Path, top_k: int = Field(default=settings.serve.top_k, ge=1, le=102), ctx: bentoml.Context = None
    ) -> PredictionResponse:
        """Species of the insect in a JPEG or PNG image, most likely first."""
        PHASES.labels(route="predict", phase="upload_parse").observe(time.perf_counter() - ctx.request.state.received_at)
        return await self.identify(image, top_k)

    async def identify(self, image: Path | bytes, top_k: int) -> PredictionResponse:
        """/predict's answer for an upload (the API's and the web app's), stored when storage is up."""
        data, decoded, served, top = await self.rank_species(image, top_k)
        return PredictionResponse(
            prediction_id=await self._store_prediction(data, decoded, served, top[0]),
            species=top[0].species,
            probability=top[0].probability,
            top_k=top,
            model=ModelInfo(name=self.name, version=served.version, backend=served.backend),
        )

    async def rank_species(self, image: Path | bytes, top_k: int) -> tuple[bytes, Image.Image, ServedModel, list[SpeciesScore]]:
        """An upload's bytes, its decoded image, the version that classified it and its `top_k`
        species, most likely first; nothing is stored."""
        # the upload's bytes and header, no pixels yet: microseconds for a phone photo (BentoML
        # wrote the file on this loop already)
        data, opened = open_image(image, settings.feedback.max_image_bytes, settings.feedback.max_image_pixels)
        to_pixels = partial(self._pixels, opened, self._model().model.image_size)
        decoded, pixels = to_pixels() if decodes_inline(opened) else await asyncio.to_thread(to_pixels)
        scored: Batched = await self.batcher(pixels)
        PHASES.labels(route="predict", phase="queue").observe(scored.queue_s)
        PHASES.labels(route="predict", phase="model").observe(scored.model_s)
        served, probabilities = scored.result, softmax(scored.logits)
        ranked = np.argsort(probabilities)[::-1][:top_k]
        top = [SpeciesScore(species=served.model.classes[i], probability=float(probabilities[i])) for i in ranked]
        return data, decoded, served, top

    @staticmethod
    def _pixels(opened: Image.Image, size: int) -> tuple[Image.Image, np.ndarray]:
        """The decoded image and the model's input for it."""
        with timed("predict", "decode"):
            decoded = decode(opened)
        with timed("predict", "preprocess"):
            return decoded, preprocess(decoded, size)

    async def _store_prediction(self, data: bytes, decoded: Image.Image, served: ServedModel, top: SpeciesScore) -> str | None:
        """The stored prediction's id; None while storage is down: a prediction never waits for
        an outage (the first failure is waited for, then storage is skipped for a few seconds)."""
        if not self.storage.available:
            return None
        try:
            return await self.storage(self._record_prediction, data, decoded, served, top)
        except ServiceUnavailable:
            return None

    def _record_prediction(self, data: bytes, decoded: Image.Image, served: ServedModel, top: SpeciesScore) -> str:
        with timed("predict", "image_store"):
            sha, key = self._store_image(data, decoded.format)
        with timed("predict", "database"):
            return db.record_prediction(
                self.db,
                model_name=self.name,
                model_version=served.version,
                backend=served.backend,
                label=top.species,
                probability=top.probability,
                image_sha256=sha,
                image_key=key,
                image_width=decoded.width,
                image_height=decoded.height,
            )

    @bentoml.api(route="/feedback")
    async def feedback(
        self,
        corrected_label: str = Field(description="the right species, one of POST /model's classes"),
        # Annotated as plain Path: BentoML 1.4 cannot build a schema for an Optional file upload.
        image: Path = Field(default=None, description="the image, JPEG or PNG (or give prediction_id)"),
        prediction_id: str | None = Field(default=None, description="instead of an image: the id /predict returned"),
        predicted_label: str | None = Field(
            default=None, description="what the model said; taken from the prediction when given"
        ),
        user_id: str | None = Field(default=None, max_length=200),
        ctx: bentoml.Context = None,
    ) -> FeedbackReceipt:
        """Record the right species for an image. A labeler's correction trains the next model; a
        client's is a suggestion until a labeler confirms it."""
        idempotency_key = ctx.request.headers.get("idempotency-key")
        if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
            raise InvalidArgument(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
        caller = ctx.request.state.caller  # set by the ApiKeys middleware
        return await self.correct(
            caller,
            corrected_label,
            image=image,
            prediction_id=prediction_id,
            predicted_label=predicted_label,
            user_id=user_id,
            idempotency_key=idempotency_key,
        )

    async def correct(
        self,
        caller: Caller,
        corrected_label: str,
        *,
        image: Path | bytes | None = None,
        prediction_id: str | None = None,
        predicted_label: str | None = None,
        user_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> FeedbackReceipt:
        """/feedback's answer (the API's and the web app's): the correction stored once."""
        kind = db.LABEL if caller.may_act_as("labeler") else db.SUGGESTION
        classes = self._model().model.classes
        if corrected_label not in classes:
            raise UnprocessableEntity(f"unknown species {corrected_label!r}; POST /model lists the {len(classes)} known ones")
        if (image is None) == (prediction_id is None):
            raise InvalidArgument("send either an image or a prediction_id, not both and not neither")
        if idempotency_key and (first := await self.storage(db.feedback_with_key, self.db, caller.name, idempotency_key)):
            return self._receipt(first)  # a retry: the first answer, nothing stored again
        if prediction_id is not None:
            earlier = await self.storage(db.get_prediction, self.db, prediction_id)
            if earlier is None:
                raise NotFound(f"no prediction with id {prediction_id!r}")
            if earlier.image_width is not None:
                check_trainable_size(earlier.image_width, earlier.image_height)
            sha, key, predicted_label = earlier.image_sha256, earlier.image_key, predicted_label or earlier.label
        else:
            if not predicted_label:
                raise InvalidArgument("predicted_label is required with an image")
            data, opened = open_image(image, settings.feedback.max_image_bytes, settings.feedback.max_image_pixels)
            check_trainable_size(*opened.size)  # from the header: an image training cannot take is never decoded
            decoded = await asyncio.to_thread(decode, opened)
            sha, key = await self.storage(self._store_image, data, decoded.format)
        stored = await self.storage(
            db.record_feedback,
            self.db,
            image_sha256=sha,
            image_key=key,
            predicted_label=predicted_label,
            corrected_label=corrected_label,
            user_id=user_id,
            prediction_id=prediction_id,
            kind=kind,
            submitted_by=caller.name,
            idempotency_key=idempotency_key,
        )
        return self._receipt(stored)

    def _receipt(self, stored) -> FeedbackReceipt:
        return FeedbackReceipt(
            feedback_id=stored.id, image_location=f"{self.images.location}/{stored.image_key}", kind=stored.kind
        )

    @bentoml.api(route="/model")
    def model(self) -> dict:
        """The served version, its backend and the species it knows."""
        served = self._model()
        return {
            **ModelInfo(name=self.name, version=served.version, backend=served.backend).model_dump(),
            "classes": served.model.classes,
            "image_size": served.model.image_size,
        }

    @health.get("/storage")
    async def storage_health(self) -> JSONResponse:
        """Whether the database and the image store were up at the storage monitor's last probe
        (every `serve.storage_retry_s`; a call here costs no store a round trip); 503 when one was
        down. Readiness (/readyz) is the model's alone: predictions go on without storage."""
        answers = {name: "up" if up else "down" for name, up in self.storage.health.items()}
        return JSONResponse(answers, status_code=200 if all(self.storage.health.values()) else 503)

    def _store_image(self, data: bytes, image_format: str) -> tuple[str, str]:
        """Store the upload (content-addressed, so a repeat is free); returns (sha256, key)."""
        sha = hashlib.sha256(data).hexdigest()
        content_type, suffix = FORMATS[image_format]
        key = image_key(settings.feedback.s3_prefix, sha, suffix)
        self.images.put(key, data, content_type)
        return sha, key


# Outermost first: who is calling, then whether there is room, then what they send (a refused
# caller's body is never read, and takes no upload slot).
API_ROUTES = {"/predict": "client", "/feedback": "client", "/model": "client"}
InsectClassifier.add_asgi_middleware(
    ApiKeys,
    authenticate=lambda digest: caller_for_digest(feedback_db(), digest),
    route_roles=API_ROUTES,
    rate_limits=settings.serve.rate_limits,
    unknown_key_limit=settings.serve.unknown_key_limit,
    session_digest=web.session_digest,
    rate_limit_store=settings.serve.rate_limit_store,
    stranger_delay_s=settings.serve.stranger_delay_s,
)
UPLOADS = {"/predict", "/feedback", f"{web.PREFIX}/identify"}
InsectClassifier.add_asgi_middleware(Admission, routes=UPLOADS, max_in_flight=settings.serve.max_in_flight)
InsectClassifier.add_asgi_middleware(
    BodyLimits,
    route_bytes=dict.fromkeys(UPLOADS, settings.feedback.max_image_bytes + FORM_OVERHEAD_BYTES),
    default_bytes=settings.serve.max_form_bytes,
    file_fields={"image"},
)
label_metrics_by_route({*API_ROUTES, *OPEN_PATHS, "/metrics", "/health/storage", *web.ROUTES}, ("/static_content/", "/app/"))

API_DESCRIPTION = """Identifies insect pests from a photo (102 IP102 species at most, the ones the
served model knows) and takes corrections that train the next model.

- `POST /predict`: a JPEG or PNG photo -> the top species with probabilities, the model version
  that answered and a `prediction_id`.
- `POST /feedback`: the right species for a photo or an earlier `prediction_id`. A labeler's
  correction trains the next model; a client's is a suggestion that waits for a labeler. Send an
  `Idempotency-Key` header (any unique string) to retry safely: a retry with the same key gets
  the first answer and stores nothing.
- `POST /model`: the served model version, its backend and the species it knows.

While feedback storage is down, `/predict` still answers, with `prediction_id` null, and
`/feedback` answers 503 with Retry-After; `GET /health/storage` says which store is down.

Every route but `/livez`, `/readyz`, `/health/storage` and this document needs an API key, sent as
`Authorization: Bearer <key>` or `X-API-Key: <key>` (`python -m feedback keys create`); `/metrics`
needs an admin's. Bodies have limits (an image's on the upload routes, a form's elsewhere), and so
have images: bytes and pixels."""


describe_openapi(InsectClassifier, title="Insect classifier", version=version("insect-mlops"), description=API_DESCRIPTION)
