"""The prune stage: structured pruning of the classifier's ViT with torch-pruning, then a short
recovery fine-tune distilled from the unpruned model
(`python -m ml.prune --model classifier.pt --out-dir D`).

Removes whole hidden channels of every transformer MLP and whole attention heads, so the result
is a smaller dense model that any runtime speeds up, not a sparse mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch_pruning as tp
import typer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from config import PruneConfig, Settings
from ml import cli
from ml.data import IP102Dataset, eval_transform
from ml.evaluate import classification_metrics, collect_logits
from ml.model import SelfAttention, SpeciesClassifier, load_classifier
from ml.results import PruneResult
from ml.runtime import eager_predict_fn
from ml.tracking import NO_RUN, RunLog
from ml.train.classifier import finetune_classifier
from ml.train.engine import seed_everything


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_attention_flops(query_shape, key_shape, value_shape, *_, out_shape=None, **__) -> int:
    """torch's FLOP counter knows the GPU attention kernels, not the CPU one."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


class PruningRegressionError(RuntimeError):
    """Pruning cost more validation accuracy than the configured bound."""


def _val_logits(model: SpeciesClassifier, dataset_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    return collect_logits(eager_predict_fn(model), dataset_dir, "val", model.image_size)


def make_heads_prunable(model: SpeciesClassifier) -> list[SelfAttention]:
    """Swap each ViT block's nn.MultiheadAttention for the equivalent SelfAttention, in place."""
    for block in model.visual.transformer.resblocks:
        if isinstance(block.attn, nn.MultiheadAttention):
            block.attn = SelfAttention(block.attn)
    return [block.attn for block in model.visual.transformer.resblocks]


def _importance(model: SpeciesClassifier, kind: str, dataset_dir: Path | None) -> tp.importance.Importance:
    if kind == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if dataset_dir is None:
        raise ValueError("Taylor importance needs training images: pass dataset_dir")
    # Taylor: |weight x gradient|, the gradient of the loss on one batch of training images
    batch = DataLoader(IP102Dataset(dataset_dir, "train", eval_transform(model.image_size)), batch_size=64, shuffle=True)
    images, labels = next(iter(batch))
    model.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    return tp.importance.GroupTaylorImportance()


def prune_structure(model: SpeciesClassifier, cfg: PruneConfig, dataset_dir: Path | None = None) -> None:
    """Remove `cfg.mlp_ratio` of each ViT block's MLP hidden channels and `cfg.head_ratio` of its
    attention heads, least important first, in place. The residual width stays: every other
    layer, the attention pooler included, is left whole."""
    attentions = make_heads_prunable(model)
    blocks = model.visual.transformer.resblocks
    prunable = {block.mlp.c_fc for block in blocks} | {attention.qkv for attention in attentions}
    ignored = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.MultiheadAttention)) and m not in prunable]
    example = torch.rand(1, 3, model.image_size, model.image_size)
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=_importance(model, cfg.importance, dataset_dir),
        ignored_layers=ignored,
        pruning_ratio=cfg.mlp_ratio,
        round_to=8,  # multiples of 8 keep matmuls vector-friendly
        num_heads={attention.qkv: attention.num_heads for attention in attentions},
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=cfg.head_ratio,
    )
    pruner.step()
    model.zero_grad(set_to_none=True)
    for attention in attentions:
        attention.num_heads = pruner.num_heads[attention.qkv]


def count_flops(model: nn.Module) -> tuple[int, int]:
    """FLOPs of one image's forward pass (2 per multiply-add) and the parameter count. Autograd
    stays on: nn.MultiheadAttention's inference fast path is invisible to the FLOP counter."""
    with FlopCounterMode(display=False) as counter:
        model(torch.rand(1, 3, model.image_size, model.image_size))
    return int(counter.get_total_flops()), sum(p.numel() for p in model.parameters())


def recovery_finetune(
    model: SpeciesClassifier, teacher: nn.Module, dataset_dir: Path, settings: Settings, out_dir: Path, run: RunLog = NO_RUN
) -> None:
    """A short fine-tune after pruning, distilled from the unpruned `teacher`."""
    seed_everything(settings.train.seed)  # the same pruned weights from the same inputs, in any process
    finetune_classifier(
        model,
        dataset_dir,
        settings.train.model_copy(update={"lr": settings.train.lr / 3}),
        epochs=settings.prune.finetune_epochs,
        stage="prune_finetune",
        checkpoint_dir=out_dir / "checkpoints",
        teacher=teacher,
        run=run,
    )


def prune(settings: Settings, *, model_path: Path, dataset_dir: Path, out_dir: Path, run: RunLog = NO_RUN) -> PruneResult:
    """Prune, fine-tune with the unpruned model as teacher, and check against it on the
    validation split.

    Raises PruningRegressionError when validation top-1 drops by more than
    `settings.prune.max_top1_drop`. Logs params, FLOPs and accuracy before/after to `run`.
    """
    cfg = settings.prune
    teacher = load_classifier(model_path)
    logits_before, labels = _val_logits(teacher, dataset_dir)
    top1_before = classification_metrics(logits_before, labels)["top1"]
    flops_before, params_before = count_flops(teacher)
    model = load_classifier(model_path)
    prune_structure(model, cfg, dataset_dir)
    flops_after, params_after = count_flops(model)
    if cfg.finetune_epochs:
        recovery_finetune(model, teacher, dataset_dir, settings, out_dir, run)
    logits_after, _ = _val_logits(model, dataset_dir)
    top1_after = classification_metrics(logits_after, labels)["top1"]
    agreement = float(np.mean(logits_after.argmax(1) == logits_before.argmax(1)))
    run.params({f"prune.{key}": value for key, value in cfg.model_dump().items()})
    run.metrics(
        {
            "prune_params_before": params_before,
            "prune_params_after": params_after,
            "prune_flops_before": flops_before,
            "prune_flops_after": flops_after,
            "prune_val_top1_before": top1_before,
            "prune_val_top1_after": top1_after,
            "prune_val_agreement": agreement,
        }
    )
    if top1_before - top1_after > cfg.max_top1_drop:
        raise PruningRegressionError(
            f"pruning {cfg.mlp_ratio:.0%} of MLP channels and {cfg.head_ratio:.0%} of heads dropped val top-1 from "
            f"{top1_before:.3f} to {top1_after:.3f} (allowed drop {cfg.max_top1_drop:.3f}); lower "
            "INSECT_PRUNE__MLP_RATIO / INSECT_PRUNE__HEAD_RATIO or raise INSECT_PRUNE__FINETUNE_EPOCHS"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model, out_dir / "pruned.pt")
    return PruneResult(
        model_path=out_dir / "pruned.pt",
        flops_before=flops_before,
        flops_after=flops_after,
        val_top1_before=top1_before,
        val_top1_after=top1_after,
    ).save(out_dir)


def main(model_path: cli.ModelPath, out_dir: cli.OutDir, dataset_dir: cli.DatasetDir = None, run_id: cli.RunId = None) -> None:
    """Prune a trained classifier and fine-tune it back; writes OUT_DIR/pruned.pt."""
    cli.run_stage(prune, run_id, dataset_dir, model_path=model_path, out_dir=out_dir)


if __name__ == "__main__":
    typer.run(main)
