"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
import io
import socket
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from config import get_settings
from feedback import db
from feedback.images import image_key, image_store
from ml.compile import export
from ml.evaluate import slice_scores
from ml.model import SpeciesClassifier, build_coca
from ml.results import SliceScores
from ml.runtime import EXPORTED_KEY
from ml.tracking import RunLog
from registry import promote, register_model

# Small enough for seconds-long steps on 2 cores, big enough for every split to hold every class.
TINY_ENV = {
    "INSECT_SYNTHETIC__NUM_CLASSES": "4",
    "INSECT_SYNTHETIC__IMAGES_PER_CLASS": "10",
    "INSECT_SYNTHETIC__MIN_TEST_IMAGES_PER_CLASS": "0",
    "INSECT_TRAIN__PRETRAIN_EPOCHS": "1",
    "INSECT_TRAIN__FINETUNE_EPOCHS": "1",
    "INSECT_TRAIN__BATCH_SIZE": "8",
    "INSECT_PRUNE__FINETUNE_EPOCHS": "1",
    "INSECT_PRUNE__MAX_TOP1_DROP": "1.0",  # an untrained tiny model has no accuracy to protect
    "INSECT_COMPILE__CUDA_ARCHS": '["sm_80"]',
    "INSECT_COMPILE__TUNING_TRIALS": "0",  # tuning has its own test
    "INSECT_FEEDBACK__FIELD_HOLDOUT_SHARE": "0",  # tests count train images; the holdout has its own tests
}


def answers(labels: list[int], right: list[bool], num_classes: int) -> SliceScores:
    """A model's scores on a slice where it gets `right` images right (a wrong one: the next class)."""
    predicted = [label if ok else (label + 1) % num_classes for label, ok in zip(labels, right, strict=True)]
    return slice_scores(np.eye(num_classes)[predicted], np.array(labels))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register_tiny_model(classes: list[str], seed: int, champion: bool = True) -> str:
    """Register an untrained tiny classifier in the configured registry; returns its version."""
    torch.manual_seed(seed)
    model = SpeciesClassifier.from_coca(build_coca("coca_tiny", vocab_size=50), classes).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt2"
        torch.export.save(export(model), path)
        model_config = {"classes": classes, "image_size": model.image_size}
        run = RunLog.start(get_settings(), run_name="tiny model")
        version = register_model(get_settings().registered_model_name, {EXPORTED_KEY: path}, model_config, {}, run)
    if champion:
        promote(get_settings().registered_model_name, version.version)
    return str(version.version)


def photo_bytes(seed: int) -> bytes:
    """A PNG no dataset contains."""
    out = io.BytesIO()
    Image.effect_noise((48, 48), 40 + seed).convert("RGB").save(out, format="PNG")
    return out.getvalue()


def post_feedback(
    settings, data: bytes, label: str, predicted: str = "rice leaf roller", kind: str = db.LABEL, submitted_by: str = "tester"
) -> int:
    """Store feedback the way the service does (image first, then the row); returns its id."""
    sha = hashlib.sha256(data).hexdigest()
    key = image_key(settings.feedback.s3_prefix, sha, ".png")
    image_store(settings).put(key, data, "image/png")
    return db.record_feedback(
        db.engine(settings),
        image_sha256=sha,
        image_key=key,
        predicted_label=predicted,
        corrected_label=label,
        user_id="tester",
        prediction_id=None,
        kind=kind,
        submitted_by=submitted_by,
    ).id
