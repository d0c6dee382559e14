"""The insect classifier as an HTTP API (BentoML 1.4).

    POST /predict    an image (JPEG/PNG) -> top-k species, with the model version that answered
    POST /feedback   a corrected label for an image or an earlier prediction -> a feedback id
    POST /model      what is being served;   /livez, /readyz, /docs.json: BentoML's own

The model is the registry's `champion`, checked against its registered sha256 before use, and
swapped in place when the alias moves. Predictions are batched across requests (adaptive
batching); feedback rows go to PostgreSQL and images to S3 (or local files), see `feedback/`.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from importlib.metadata import version
from pathlib import Path

import attr
import bentoml
import numpy as np
import sqlalchemy as sa
from bentoml._internal.service.openapi.specification import Info
from bentoml.exceptions import BentoMLException, InvalidArgument, NotFound, ServiceUnavailable, UnprocessableEntity
from botocore.exceptions import BotoCoreError, ClientError
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field

from bentos.guards import INTERNAL_HEADER, INTERNAL_TOKEN, ApiKeys, UploadLimits
from config import get_settings
from feedback import db
from feedback.images import image_key, image_store
from feedback.keys import caller_for
from ml.data.ip102 import MAX_SIDE, MIN_SIDE
from ml.tracking import configure
from registry import ServedModel, load_verified, version_by_alias
from registry.pyfunc import preprocess

logger = logging.getLogger("bentoml.insect")
settings = get_settings()
# MPO: what Pillow calls the JPEGs many phones write (a JPEG with a second, depth or preview, frame)
FORMATS = {"JPEG": ("image/jpeg", ".jpg"), "MPO": ("image/jpeg", ".jpg"), "PNG": ("image/png", ".png")}
MAX_RELOAD_DELAY_S = 3600.0  # the longest wait before a version that failed to load is tried again
MAX_IDEMPOTENCY_KEY = 200  # characters of a client's Idempotency-Key header
FORM_OVERHEAD_BYTES = 64 * 1024  # a request may carry this much besides the image: fields, part headers


class SpeciesScore(BaseModel):
    species: str
    probability: float


class ModelInfo(BaseModel):
    name: str
    version: str
    backend: str = Field(description="torch-eager, or tvm-llvm when a TVM build for this CPU was registered")


class PredictionResponse(BaseModel):
    prediction_id: str = Field(description="pass it to /feedback to correct this prediction")
    species: str
    probability: float
    top_k: list[SpeciesScore]
    model: ModelInfo


class Scores(BaseModel):
    """One image's class probabilities and the version that produced them."""

    probabilities: list[float]
    version: str


class FeedbackReceipt(BaseModel):
    feedback_id: int
    image_location: str
    kind: str = Field(description="label (trains the next model) or suggestion (waits for a labeler)")


class InputTooLarge(BentoMLException):
    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class NotAnImage(BentoMLException):
    error_code = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


def read_image(path: Path, max_bytes: int) -> tuple[bytes, Image.Image]:
    """The upload's bytes and decoded image; 4xx errors for anything else. Decoding is CPU work:
    callers on the event loop run it in a thread."""
    size = path.stat().st_size
    if size == 0:
        raise InvalidArgument("the uploaded image is empty")
    if size > max_bytes:
        raise InputTooLarge(f"the image is {size} bytes; the limit is {max_bytes}")
    data = path.read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow only warns up to twice its limit
            image = Image.open(io.BytesIO(data))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InputTooLarge(f"the image decodes to too many pixels: {error}") from error
    except (UnidentifiedImageError, OSError) as error:
        raise NotAnImage(f"not a readable JPEG or PNG image: {error}") from error
    if image.format not in FORMATS:
        raise NotAnImage(f"{image.format} images are not accepted; send JPEG or PNG")
    return data, image


def check_trainable_size(width: int, height: int) -> None:
    """Feedback becomes training data: its sides must be within what the dataset suite accepts
    (a prediction takes any size: it is resized)."""
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise UnprocessableEntity(f"the image is {width}x{height} px; feedback needs sides from {MIN_SIDE} to {MAX_SIDE} px")


@contextmanager
def storage_unavailable_as_503() -> Iterator[None]:
    """A database or bucket outage is the client's cue to retry, not a server bug."""
    try:
        yield
    except (sa.exc.OperationalError, BotoCoreError, ClientError, OSError) as error:
        logger.exception("feedback storage failed")
        raise ServiceUnavailable(f"feedback storage is unavailable, retry later ({type(error).__name__})") from error


@bentoml.service(
    name="insect_classifier",
    workers=1,
    threads=8,
    traffic={"timeout": 60, "max_concurrency": 256},
    http={"port": settings.serve.port, "host": settings.serve.host},
)
class InsectClassifier:
    def __init__(self) -> None:
        configure(settings)
        self.name = settings.registered_model_name
        self.served: ServedModel | None = None
        self.db = db.engine(settings)
        self.images = image_store(settings)
        self._reload()
        threading.Thread(target=self._watch_alias, name="alias-watcher", daemon=True).start()

    def _reload(self) -> None:
        """Serve the version the alias points at now, if it is not served already."""
        current = version_by_alias(self.name, settings.serve.alias)
        if current is None or (self.served and self.served.version == str(current.version)):
            return
        self.served = load_verified(self.name, settings.serve.alias, settings.serve.backend)
        logger.info("serving %s v%s (%s)", self.name, self.served.version, self.served.backend)

    def _watch_alias(self) -> None:
        """Follow the alias. A version that fails to load leaves the served one serving, is logged
        once, and is tried again only after a delay that doubles each time (up to an hour), instead
        of being downloaded again at every poll."""
        retry = {}  # version that failed -> (when to try it again, the delay after that)
        while True:
            threading.Event().wait(settings.serve.reload_interval_s)
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

    def __is_ready__(self) -> bool:
        return self.served is not None

    def _model(self) -> ServedModel:
        if self.served is None:
            raise ServiceUnavailable(f"no {self.name!r} version has alias {settings.serve.alias!r} yet")
        return self.served

    @bentoml.api(batchable=True, max_batch_size=settings.serve.max_batch_size, max_latency_ms=settings.serve.max_latency_ms)
    def classify(self, images: np.ndarray) -> list[Scores]:
        """Class probabilities for a batch of preprocessed images (float32 NCHW in [0, 1])."""
        served = self._model()  # one version for the whole batch
        logits = served.predict(images.astype(np.float32))
        probabilities = np.exp(logits - logits.max(1, keepdims=True))
        probabilities /= probabilities.sum(1, keepdims=True)
        return [Scores(probabilities=row.tolist(), version=served.version) for row in probabilities]

    @bentoml.api(route="/predict")
    async def predict(self, image: Path, top_k: int = Field(default=settings.serve.top_k, ge=1, le=102)) -> PredictionResponse:
        """Species of the insect in a JPEG or PNG image, most likely first."""
        data, decoded = await asyncio.to_thread(read_image, image, settings.feedback.max_image_bytes)
        served = self._model()
        pixels = await asyncio.to_thread(preprocess, decoded, served.model.image_size)
        scores = (await self._batched_classify()(pixels[None]))[0]
        if scores.version != served.version:  # the champion moved while this image queued
            served = self._model()
        ranked = np.argsort(scores.probabilities)[::-1][:top_k]
        top = [SpeciesScore(species=served.model.classes[i], probability=scores.probabilities[i]) for i in ranked]
        with storage_unavailable_as_503():
            sha, key = await asyncio.to_thread(self._store_image, data, decoded.format)
            prediction_id = await asyncio.to_thread(
                db.record_prediction,
                self.db,
                model_name=self.name,
                model_version=scores.version,
                backend=served.backend,
                label=top[0].species,
                probability=top[0].probability,
                image_sha256=sha,
                image_key=key,
                image_width=decoded.width,
                image_height=decoded.height,
            )
        return PredictionResponse(
            prediction_id=prediction_id,
            species=top[0].species,
            probability=top[0].probability,
            top_k=top,
            model=ModelInfo(name=self.name, version=scores.version, backend=served.backend),
        )

    @bentoml.api(route="/feedback")
    def feedback(
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
        caller = ctx.request.state.caller  # set by the ApiKeys middleware
        kind = db.LABEL if caller.may_act_as("labeler") else db.SUGGESTION
        idempotency_key = ctx.request.headers.get("idempotency-key")
        if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
            raise InvalidArgument(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
        classes = self._model().model.classes
        if corrected_label not in classes:
            raise UnprocessableEntity(f"unknown species {corrected_label!r}; POST /model lists the {len(classes)} known ones")
        if (image is None) == (prediction_id is None):
            raise InvalidArgument("send either an image or a prediction_id, not both and not neither")
        with storage_unavailable_as_503():
            if idempotency_key and (first := db.feedback_with_key(self.db, caller.name, idempotency_key)):
                return self._receipt(first)  # a retry: the first answer, nothing stored again
            if prediction_id is not None:
                earlier = db.get_prediction(self.db, prediction_id)
                if earlier is None:
                    raise NotFound(f"no prediction with id {prediction_id!r}")
                if earlier.image_width is not None:
                    check_trainable_size(earlier.image_width, earlier.image_height)
                sha, key, predicted_label = earlier.image_sha256, earlier.image_key, predicted_label or earlier.label
            else:
                if not predicted_label:
                    raise InvalidArgument("predicted_label is required with an image")
                data, decoded = read_image(image, settings.feedback.max_image_bytes)
                check_trainable_size(*decoded.size)
                sha, key = self._store_image(data, decoded.format)
            stored = db.record_feedback(
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

    def _batched_classify(self):
        """`classify` through BentoML's batching, which calls the route on the service's own ASGI
        app: with this process's token, the one way past the guards to that internal route."""
        self.to_async.default_headers[INTERNAL_HEADER] = INTERNAL_TOKEN  # its sessions share this dict
        return self.to_async.classify

    def _store_image(self, data: bytes, image_format: str) -> tuple[str, str]:
        """Store the upload (content-addressed, so a repeat is free); returns (sha256, key)."""
        sha = hashlib.sha256(data).hexdigest()
        content_type, suffix = FORMATS[image_format]
        key = image_key(settings.feedback.s3_prefix, sha, suffix)
        self.images.put(key, data, content_type)
        return sha, key


# Outermost first: who is calling, then what they send (a refused caller's body is never read).
InsectClassifier.add_asgi_middleware(
    ApiKeys,
    authenticate=lambda key: caller_for(db.engine(settings), key),
    route_roles={"/predict": "client", "/feedback": "client", "/model": "client"},
    internal_routes={"/classify"},
    rate_limits=settings.serve.rate_limits,
)
InsectClassifier.add_asgi_middleware(
    UploadLimits,
    routes={"/predict", "/feedback"},
    max_bytes=settings.feedback.max_image_bytes + FORM_OVERHEAD_BYTES,
    file_fields={"image"},
)

API_DESCRIPTION = """Identifies insect pests from a photo (102 IP102 species at most, the ones the
served model knows) and takes corrections that train the next model.

- `POST /predict`: a JPEG or PNG photo -> the top species with probabilities, the model version
  that answered and a `prediction_id`.
- `POST /feedback`: the right species for a photo or an earlier `prediction_id`. A labeler's
  correction trains the next model; a client's is a suggestion that waits for a labeler. Send an
  `Idempotency-Key` header (any unique string) to retry safely: a retry with the same key gets
  the first answer and stores nothing.
- `POST /model`: the served model version, its backend and the species it knows.

Every route but `/livez`, `/readyz`, `/metrics` and this document needs an API key, sent as
`Authorization: Bearer <key>` or `X-API-Key: <key>` (`python -m feedback keys create`)."""


class _DescribedService(type(InsectClassifier)):
    """BentoML's service, with this API's own title, version and description in its OpenAPI
    document: BentoML fills them in with its boilerplate unless it serves a built Bento."""

    __slots__ = ()  # the same layout as its base, so the service object can take this class

    @property
    def openapi_spec(self):
        spec = super().openapi_spec
        info = Info(title="Insect classifier", version=version("insect-mlops"), description=API_DESCRIPTION)
        return attr.evolve(spec, info=info)


InsectClassifier.__class__ = _DescribedService
