"""The drift watch: do users' photos still look like what the champion was trained for?

The champion, loaded and checked as the service loads it, scores the images of the newest
`drift.window` predictions and the current dataset's lab images it never trained on; the MMD
test of ml/drift.py compares the two. MMD² and the p-value go to MLflow, each prediction's
witness score to PostgreSQL (`drift_scores`), where labelers find the least familiar images first.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

from config import Settings
from feedback import db
from feedback.images import image_store
from ml.data.versions import current_dataset
from ml.drift import mmd_test, reference_logits
from ml.tracking import RunLog, configure
from registry import CHAMPION, load_verified
from registry.pyfunc import preprocess

log = logging.getLogger(__name__)
BATCH = 64
RUN_NAME = "drift-watch"  # every watch's MLflow run


@dataclass(frozen=True)
class DriftReport:
    model_version: str
    predictions: int  # images compared with the reference
    reference: int
    mmd2: float
    p_value: float
    drifted: bool


def watch(settings: Settings, run: RunLog) -> DriftReport | None:
    """Test the newest predictions for drift; None (and why, in the log) when there is nothing to test."""
    cfg, engine = settings.drift, db.engine(settings)
    configure(settings)
    champion = load_verified(settings, CHAMPION)
    size = champion.model.image_size if champion else 0
    store = image_store(settings)
    images = {}  # prediction id -> pixels; a missing or undecodable image is left out, not fatal
    for row in db.recent_predictions(engine, cfg.window) if champion else []:
        if (pixels := _pixels(store.get(row.image_key), size)) is not None:
            images[row.id] = pixels
    if len(images) < cfg.min_predictions:
        log.info(
            "no drift test: %d predictions with readable images, %d needed, champion %s",
            len(images),
            cfg.min_predictions,
            champion and champion.version,
        )
        return None
    pixels = np.stack(list(images.values()))
    current = np.concatenate([champion.predict(pixels[i : i + BATCH]) for i in range(0, len(pixels), BATCH)])
    reference = reference_logits(champion.predict, current_dataset(settings), size)
    test = mmd_test(reference, current, cfg.permutations)
    report = DriftReport(champion.version, len(current), len(reference), test.mmd2, test.p_value, test.drifted(cfg.alpha))
    run.params({"drift.model_version": report.model_version, "drift.window": cfg.window, "drift.alpha": cfg.alpha})
    run.metrics(
        {
            "drift_mmd2": report.mmd2,
            "drift_p_value": report.p_value,
            "drifted": float(report.drifted),
            "drift_predictions": report.predictions,
            "drift_reference": report.reference,
        }
    )
    db.record_drift(engine, run.run_id or "", dict(zip(images, test.witness.tolist(), strict=True)), report.drifted)
    verdict = "DRIFT: users' photos differ from" if report.drifted else "no drift: users' photos are like"
    log.warning(
        "%s the lab images (MMD² %.4f, p = %.4f, alpha %s) over the newest %d predictions of v%s; labelers see them "
        "least familiar first",
        verdict, report.mmd2, report.p_value, cfg.alpha, report.predictions, report.model_version,
    )  # fmt: skip
    return report


def _pixels(data: bytes | None, size: int) -> np.ndarray | None:
    if data is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return preprocess(image, size)
    except (OSError, Image.DecompressionBombError, ValueError):
        return None


def latest_report(settings: Settings) -> DriftReport | None:
    """The newest watch that tested predictions, read back from its MLflow run."""
    import mlflow

    configure(settings)
    runs = mlflow.search_runs(
        experiment_names=[settings.experiment_name],
        filter_string=f"run_name = '{RUN_NAME}' and metrics.drift_p_value >= 0",
        order_by=["start_time DESC"],
        max_results=1,
        output_format="list",
    )
    if not runs:
        return None
    metrics, params = runs[0].data.metrics, runs[0].data.params
    return DriftReport(
        model_version=params["drift.model_version"],
        predictions=int(metrics["drift_predictions"]),
        reference=int(metrics["drift_reference"]),
        mmd2=metrics["drift_mmd2"],
        p_value=metrics["drift_p_value"],
        drifted=bool(metrics["drifted"]),
    )
