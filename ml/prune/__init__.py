"""Structured pruning of the classifier's ViT with torch-pruning, then a short recovery fine-tune.

Removes whole hidden channels of every transformer MLP (the layers that carry most of the
FLOPs), so the result is a smaller dense model that any runtime speeds up, not a sparse mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from config import Settings
from ml.evaluate import classification_metrics, collect_logits, torch_predict_fn
from ml.model import SpeciesClassifier
from ml.train import recovery_finetune


class PruningRegressionError(RuntimeError):
    """Pruning cost more validation accuracy than the configured bound."""


@dataclass(frozen=True)
class PruneResult:
    model_path: Path
    macs_before: int
    macs_after: int
    val_top1_before: float
    val_top1_after: float


def load_model(path: Path) -> SpeciesClassifier:
    """A whole pickled classifier written by an earlier step of this pipeline (trusted input)."""
    return torch.load(path, weights_only=False)


def _val_logits(model: SpeciesClassifier, dataset_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    return collect_logits(torch_predict_fn(model), dataset_dir, "val", model.image_size)


def prune_mlp_channels(model: SpeciesClassifier, ratio: float) -> None:
    """Remove `ratio` of each ViT block's MLP hidden channels, lowest L2 magnitude first, in place."""
    mlp_inputs = {block.mlp.c_fc for block in model.visual.transformer.resblocks}
    ignored = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.MultiheadAttention)) and m not in mlp_inputs]
    example = torch.rand(1, 3, model.image_size, model.image_size)
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio, ignored_layers=ignored, round_to=8,  # multiples of 8 keep matmuls vector-friendly
    )
    pruner.step()


def count_macs(model: nn.Module) -> tuple[int, int]:
    example = torch.rand(1, 3, model.image_size, model.image_size)
    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)


def prune(model_path: Path, dataset_dir: Path, settings: Settings, out_dir: Path) -> PruneResult:
    """Prune, fine-tune, and check against the unpruned model on the validation split.

    Raises PruningRegressionError when validation top-1 drops by more than
    `settings.prune.max_top1_drop`. Logs params, MACs and accuracy before/after to MLflow.
    """
    cfg = settings.prune
    model = load_model(model_path).eval()
    logits_before, labels = _val_logits(model, dataset_dir)
    top1_before = classification_metrics(logits_before, labels)["top1"]
    macs_before, params_before = count_macs(model)
    prune_mlp_channels(model, cfg.ratio)
    macs_after, params_after = count_macs(model)
    top1_after = recovery_finetune(model, dataset_dir, settings, cfg, out_dir) if cfg.finetune_epochs else \
        classification_metrics(*_val_logits(model, dataset_dir))["top1"]
    agreement = float(np.mean(_val_logits(model, dataset_dir)[0].argmax(1) == logits_before.argmax(1)))
    mlflow.log_params({"prune.ratio": cfg.ratio, "prune.finetune_epochs": cfg.finetune_epochs})
    mlflow.log_metrics({
        "prune_params_before": params_before, "prune_params_after": params_after,
        "prune_macs_before": macs_before, "prune_macs_after": macs_after,
        "prune_val_top1_before": top1_before, "prune_val_top1_after": top1_after,
        "prune_val_agreement": agreement,
    })
    if top1_before - top1_after > cfg.max_top1_drop:
        raise PruningRegressionError(
            f"pruning {cfg.ratio:.0%} of MLP channels dropped val top-1 from {top1_before:.3f} to {top1_after:.3f} "
            f"(allowed drop {cfg.max_top1_drop:.3f}); lower INSECT_PRUNE__RATIO or raise INSECT_PRUNE__FINETUNE_EPOCHS"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    pruned_path = out_dir / "pruned.pt"
    torch.save(model, pruned_path)
    return PruneResult(pruned_path, macs_before, macs_after, top1_before, top1_after)
