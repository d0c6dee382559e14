"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import torch

from config import get_settings
from ml.compile import export
from ml.model import SpeciesClassifier, build_coca
from registry import promote, register_model
from registry.tracking import run as tracked_run

# Small enough for seconds-long steps on 2 cores, big enough for every split to hold every class.
TINY_ENV = {
    "INSECT_SYNTHETIC__NUM_CLASSES": "4",
    "INSECT_SYNTHETIC__IMAGES_PER_CLASS": "10",
    "INSECT_TRAIN__PRETRAIN_EPOCHS": "1",
    "INSECT_TRAIN__FINETUNE_EPOCHS": "1",
    "INSECT_TRAIN__BATCH_SIZE": "8",
    "INSECT_PRUNE__FINETUNE_EPOCHS": "1",
    "INSECT_PRUNE__MAX_TOP1_DROP": "1.0",  # an untrained tiny model has no accuracy to protect
    "INSECT_COMPILE__CUDA_ARCHS": '["sm_80"]',
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register_tiny_model(classes: list[str], seed: int, champion: bool = True) -> str:
    """Register an untrained tiny classifier in the configured registry; returns its version."""
    torch.manual_seed(seed)
    model = SpeciesClassifier.from_coca(build_coca("coca_tiny", vocab_size=50), classes).eval()
    with tempfile.TemporaryDirectory() as tmp, tracked_run(get_settings()):
        path = Path(tmp) / "model.pt2"
        torch.export.save(export(model), path)
        version = register_model(get_settings().registered_model_name, {"exported": path},
                                 {"classes": classes, "image_size": model.image_size}, tags={})
    if champion:
        promote(get_settings().registered_model_name, version.version)
    return str(version.version)
