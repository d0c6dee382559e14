"""Top-1, top-5, macro-F1 and a confusion matrix for any model given as a batch -> logits function."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.metrics import ConfusionMatrixDisplay, f1_score
from torch.utils.data import DataLoader
from tqdm import tqdm

from ml.data import IP102Dataset, eval_transform

PredictFn = Callable[[np.ndarray], np.ndarray]  # float32 NCHW in [0, 1] -> logits (N, classes)


def torch_predict_fn(model: torch.nn.Module) -> PredictFn:
    model.eval()

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()

    return predict


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


def evaluate(
    predict: PredictFn, dataset_dir: Path, classes: list[str], image_size: int, out_dir: Path | None = None, split: str = "test"
) -> dict[str, float]:
    """Metrics of `predict` on one split; with `out_dir`, also writes confusion_matrix.png there."""
    logits, labels = collect_logits(predict, dataset_dir, split, image_size)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        confusion_matrix_plot(logits, labels, classes, out_dir / "confusion_matrix.png")
    return classification_metrics(logits, labels)
