"""The evaluate stage: top-1, top-5, macro-F1 and a confusion matrix on the test split, for the
candidate and, when given, the served champion (`python -m ml.evaluate --model M --out-dir D`).
`score` does it for any model given as a batch -> logits function."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt
import numpy as np
import typer
from sklearn.metrics import ConfusionMatrixDisplay, f1_score
from torch.utils.data import DataLoader
from tqdm import tqdm

from config import Settings
from ml import cli
from ml.data import IP102Dataset, eval_transform
from ml.results import Evaluation
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


def confusion_matrix_plot(logits: np.ndarray, labels: np.ndarray, classes: list[str], path: Path) -> Path:
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
    ax.set_title("Confusion matrix (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def score(
    predict: PredictFn, dataset_dir: Path, classes: list[str], image_size: int, out_dir: Path | None = None, split: str = "test"
) -> dict[str, float]:
    """Metrics of `predict` on one split; with `out_dir`, also writes confusion_matrix.png there."""
    logits, labels = collect_logits(predict, dataset_dir, split, image_size)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        confusion_matrix_plot(logits, labels, classes, out_dir / "confusion_matrix.png")
    return classification_metrics(logits, labels)


def evaluate(
    settings: Settings,
    *,
    model_path: Path,
    dataset_dir: Path,
    out_dir: Path,
    baseline: PredictFn | None = None,
    run: RunLog = NO_RUN,
) -> Evaluation:
    """The candidate at `model_path` and the `baseline` (the champion), on the same test split.
    Logs the candidate's metrics, the baseline's as `champion_*`, and the confusion matrix."""
    from ml.model import load_classifier

    model = load_classifier(model_path)
    candidate = score(eager_predict_fn(model), dataset_dir, model.classes, model.image_size, out_dir)
    run.metrics(candidate)
    run.artifact(out_dir / "confusion_matrix.png", "evaluation")
    champion = None
    if baseline is not None:
        champion = score(baseline, dataset_dir, model.classes, model.image_size)
        run.metrics({f"champion_{key}": value for key, value in champion.items()})
    return Evaluation(candidate=candidate, baseline=champion, classes=model.classes, image_size=model.image_size).save(out_dir)


def main(model_path: cli.ModelPath, out_dir: cli.OutDir, dataset_dir: cli.DatasetDir = None, run_id: cli.RunId = None) -> None:
    """Score a classifier on the test split (no champion: that is the registry's)."""
    cli.run_stage(evaluate, run_id, dataset_dir, model_path=model_path, out_dir=out_dir)


if __name__ == "__main__":
    typer.run(main)
