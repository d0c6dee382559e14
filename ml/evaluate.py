"""The evaluate stage: the candidate and, when given, the served champion on every evaluation
slice (`lab`: the test split; `field`: users' photos held out of training), with top-1, top-5,
macro-F1, worst-class recall, calibration (ECE), per-class recall, a confusion matrix, and each
image's answer for the gate's paired tests (`python -m ml.evaluate --model M --out-dir D`).
`score` does it for any model given as a batch -> logits function."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt
import numpy as np
import typer
from scipy.special import softmax
from sklearn.metrics import ConfusionMatrixDisplay, f1_score, recall_score
from torch.utils.data import DataLoader
from tqdm import tqdm

from config import Settings
from ml import cli
from ml.data import IP102Dataset, eval_transform, read_split
from ml.data.ip102 import FIELD_SPLIT
from ml.results import Evaluation, SliceScores
from ml.runtime import PredictFn, eager_predict_fn
from ml.tracking import NO_RUN, RunLog


def collect_logits(
    predict: PredictFn, dataset_dir: Path, split: str, image_size: int, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    loader = DataLoader(IP102Dataset(dataset_dir, split, eval_transform(image_size)), batch_size=batch_size)
    logits, labels = [], []
    for images, targets in tqdm(loader, desc=f"predicting {split}", unit="batch", leave=False):
        logits.append(predict(images.numpy()))
        labels.append(targets.numpy())
    return np.concatenate(logits), np.concatenate(labels)


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    ranked = np.argsort(-logits, axis=1)
    k = min(5, logits.shape[1])
    return {
        "top1": float(np.mean(ranked[:, 0] == labels)),
        "top5": float(np.mean((ranked[:, :k] == labels[:, None]).any(axis=1))),
        "macro_f1": float(f1_score(labels, ranked[:, 0], average="macro", labels=np.arange(logits.shape[1]), zero_division=0)),
    }


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """How far confidence is from accuracy: |accuracy - mean confidence| per confidence bin,
    weighted by the bin's share of images (Guo et al. 2017)."""
    probabilities = softmax(logits, axis=1)
    confidence, correct = probabilities.max(1), probabilities.argmax(1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    gaps = [abs(correct[which == b].mean() - confidence[which == b].mean()) * np.mean(which == b) for b in np.unique(which)]
    return float(sum(gaps))


def slice_scores(logits: np.ndarray, labels: np.ndarray) -> SliceScores:
    num_classes = logits.shape[1]
    predicted = logits.argmax(1)
    present = np.isin(np.arange(num_classes), labels)
    recall = recall_score(labels, predicted, labels=np.arange(num_classes), average=None, zero_division=0)
    metrics = classification_metrics(logits, labels) | {
        "worst_class_recall": float(recall[present].min()),
        "ece": expected_calibration_error(logits, labels),
    }
    class_recall = [float(r) if p else None for r, p in zip(recall, present, strict=True)]
    return SliceScores(metrics=metrics, class_recall=class_recall, predicted=predicted.tolist(), labels=labels.tolist())


def confusion_matrix_plot(logits: np.ndarray, labels: np.ndarray, classes: list[str], title: str, path: Path) -> Path:
    size = max(6, 0.35 * len(classes))
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(
        labels,
        logits.argmax(1),
        labels=np.arange(len(classes)),
        display_labels=classes,
        ax=ax,
        xticks_rotation="vertical",
        colorbar=False,
        include_values=len(classes) <= 20,
    )
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def evaluation_slices(dataset_dir: Path) -> dict[str, str]:
    """Slice name -> the split it reads: `lab` (the test split: photos like the training set's)
    always, `field` (users' corrected photos held out of training) once a version has any."""
    field = read_split(dataset_dir, FIELD_SPLIT, optional=True)
    return {"lab": "test", **({"field": FIELD_SPLIT} if field else {})}


def score(
    predict: PredictFn, dataset_dir: Path, classes: list[str], image_size: int, out_dir: Path | None = None
) -> dict[str, SliceScores]:
    """`predict` on every slice of the dataset; with `out_dir`, also a confusion matrix per slice there."""
    scores = {}
    for name, split in evaluation_slices(dataset_dir).items():
        logits, labels = collect_logits(predict, dataset_dir, split, image_size)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            title = f"Confusion matrix, {name} slice ({split} split, {len(labels)} images)"
            confusion_matrix_plot(logits, labels, classes, title, out_dir / f"confusion_matrix_{name}.png")
        scores[name] = slice_scores(logits, labels)
    return scores


def evaluate(
    settings: Settings,
    *,
    model_path: Path,
    dataset_dir: Path,
    out_dir: Path,
    baseline: PredictFn | None = None,
    run: RunLog = NO_RUN,
) -> Evaluation:
    """The candidate at `model_path` and the `baseline` (the champion), on the same images of
    every slice. Logs the candidate's metrics as `<slice>_<metric>`, the baseline's as
    `champion_<slice>_<metric>`, and the confusion matrices."""
    from ml.model import load_classifier

    model = load_classifier(model_path)
    candidate = score(eager_predict_fn(model), dataset_dir, model.classes, model.image_size, out_dir)
    champion = None if baseline is None else score(baseline, dataset_dir, model.classes, model.image_size)
    evaluation = Evaluation(candidate=candidate, baseline=champion, classes=model.classes, image_size=model.image_size)
    run.metrics(evaluation.metrics())
    run.metrics({f"champion_{key}": value for key, value in evaluation.metrics("baseline").items()})
    for plot in sorted(out_dir.glob("confusion_matrix_*.png")):
        run.artifact(plot, "evaluation")
    return evaluation.save(out_dir)


def main(model_path: cli.ModelPath, out_dir: cli.OutDir, dataset_dir: cli.DatasetDir = None, run_id: cli.RunId = None) -> None:
    """Score a classifier on every slice of the dataset (no champion: that is the registry's)."""
    cli.run_stage(evaluate, run_id, dataset_dir, model_path=model_path, out_dir=out_dir)


if __name__ == "__main__":
    typer.run(main)
