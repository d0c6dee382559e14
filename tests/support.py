"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from config.ports import free_port
from feedback import db
from feedback.images import image_key, image_store
from ml.evaluate import slice_scores
from ml.results import SliceScores

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


# A script that parses the DAG files with every connection refused (argv[1]: the DAG folder): parsing
# runs every few seconds in the DAG processor and must not reach a database or the network.
PARSE_WITHOUT_CONNECTIONS = """
import socket, sqlite3, sys
import psycopg2

def refuse(*args, **kwargs):
    raise RuntimeError("parsing a DAG file opened a connection")

socket.socket.connect = socket.create_connection = sqlite3.connect = psycopg2.connect = refuse
from airflow.dag_processing.dagbag import DagBag

bag = DagBag(dag_folder=sys.argv[1])
print(sorted(bag.dag_ids), bag.import_errors)
sys.exit(1 if bag.import_errors else 0)
"""


def answers(labels: list[int], right: list[bool], num_classes: int) -> SliceScores:
    """A model's scores on a slice where it gets `right` images right (a wrong one: the next class)."""
    predicted = [label if ok else (label + 1) % num_classes for label, ok in zip(labels, right, strict=True)]
    return slice_scores(np.eye(num_classes)[predicted], np.array(labels))


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


def bento_env(data_dir: Path, port: int, database_url: str, s3_endpoint: str, bucket: str, **extra: str) -> dict[str, str]:
    """The service's settings for a test: tiny models, a registry in `data_dir`, the given
    PostgreSQL and S3, a fast alias poll, and rate limits and a delay of strangers' refusals that
    no test waits for unless it sets its own (the fuzzer sends hundreds of refused requests)."""
    return {
        **TINY_ENV,
        "INSECT_DATA_DIR": str(data_dir),
        "MLFLOW_TRACKING_URI": f"sqlite:///{data_dir / 'mlflow.db'}",
        "INSECT_FEEDBACK__DATABASE_URL": database_url,
        "INSECT_FEEDBACK__S3_BUCKET": bucket,
        "INSECT_FEEDBACK__S3_ENDPOINT_URL": s3_endpoint,
        "INSECT_SERVE__RELOAD_INTERVAL_S": "1",
        "INSECT_SERVE__PORT": str(port),
        "INSECT_SERVE__RATE_LIMITS": json.dumps({role: "1000000/minute" for role in ("client", "labeler", "admin")}),
        "INSECT_SERVE__STRANGER_DELAY_S": "0.05",
        **extra,
    }


class S3Server:
    """moto's S3 API on a localhost port of its own, which a test may stop and start again: the
    buckets live in this process's moto backends, so they outlast a restart, as a real store's do."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> S3Server:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()
