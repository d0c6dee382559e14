"""Training through DeepSpeed: CoCa pretraining on image-caption pairs, then the species classifier.

Runs single-process as plain Python (rank 0 of 1) or under the `deepspeed` launcher, on CPU
(`DS_ACCELERATOR=cpu`) or GPU; engine settings come from `ds_config.json`, sizes from `config`.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from config import PruneConfig, Settings, TrainConfig
from ml.data import IP102Dataset, all_captions, caption, read_classes, train_transform
from ml.evaluate import classification_metrics, collect_logits, torch_predict_fn
from ml.model import CaptionTokenizer, SpeciesClassifier, build_coca, load_config

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]
ScoreFn = Callable[[torch.nn.Module], float]  # higher is better


@dataclass(frozen=True)
class TrainResult:
    model_path: Path  # the whole classifier, torch.save'd, for the prune step
    val_top1: float
    epochs_run: int


def _distributed_defaults() -> None:
    """Let plain `python` act as rank 0 of 1; the deepspeed launcher sets these itself."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def deepspeed_engine(model: torch.nn.Module, cfg: TrainConfig, total_steps: int):
    """A DeepSpeed engine for `model`, with batch size, learning rate and schedule from `cfg`."""
    _distributed_defaults()
    import deepspeed  # late: importing it picks the accelerator from the environment set above

    ds_config = json.loads(Path(cfg.deepspeed_config).read_text())
    ds_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds_config["optimizer"]["params"].update(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if "scheduler" in ds_config:
        ds_config["scheduler"]["params"]["total_num_steps"] = max(1, total_steps)
        ds_config["scheduler"]["params"]["warmup_num_steps"] = max(1, min(total_steps // 10, 100))
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config
    )
    return engine


def fit(model: torch.nn.Module, loader: DataLoader, loss_fn: LossFn, score_fn: ScoreFn, *, cfg: TrainConfig,
        epochs: int, stage: str, checkpoint_dir: Path) -> tuple[float, int]:
    """Train with early stopping on `score_fn`; the best epoch's weights are restored from its
    DeepSpeed checkpoint. Returns (best score, epochs run). Metrics go to the active MLflow run."""
    steps_per_epoch = min(len(loader), cfg.max_steps_per_epoch or len(loader))
    own_attributes = {id(p): set(vars(p)) for p in model.parameters()}
    engine = deepspeed_engine(model, cfg, steps_per_epoch * epochs)
    best, best_epoch, epoch = -float("inf"), -1, 0
    for epoch in range(epochs):
        engine.train()
        losses = []
        batches = tqdm(loader, total=steps_per_epoch, desc=f"{stage} epoch {epoch + 1}/{epochs}", unit="batch")
        for step, batch in enumerate(batches):
            if step == steps_per_epoch:
                break
            loss = loss_fn(engine, batch)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            batches.set_postfix(loss=f"{np.mean(losses):.3f}")
        engine.eval()
        score = score_fn(engine.module)
        mlflow.log_metrics({f"{stage}_train_loss": float(np.mean(losses)), f"{stage}_val_score": score}, step=epoch)
        if score > best:
            best, best_epoch = score, epoch
            engine.save_checkpoint(str(checkpoint_dir), tag=f"{stage}-best")
        elif epoch - best_epoch >= cfg.patience:
            break
    engine.load_checkpoint(str(checkpoint_dir), tag=f"{stage}-best", load_optimizer_states=False, load_lr_scheduler_states=False)
    _release(engine, own_attributes)
    return best, epoch + 1


def _release(engine, own_attributes: dict[int, set[str]]) -> None:
    """Detach DeepSpeed from the module, leaving a plain one behind (picklable, exportable): drop
    its forward hooks and the attributes ZeRO hung on each parameter (process groups among them)."""
    engine.destroy()
    for hook in (engine.module_forward_pre_hook, engine.module_forward_post_hook):
        if hook is not None:
            hook.remove()
    for param in engine.module.parameters():
        for key in set(vars(param)) - own_attributes.get(id(param), set()):
            delattr(param, key)


def _caption_collate(classes: list[str], tokenize, rng: random.Random):
    def collate(items):
        images = torch.stack([image for image, _ in items])
        texts = tokenize([caption(classes[label], rng) for _, label in items])
        return images, texts

    return collate


def pretrain_coca(settings: Settings, dataset_dir: Path, checkpoint_dir: Path):
    """Stage 1: CoCa on (image, templated species caption) pairs, contrastive + captioning loss."""
    from open_clip.loss import CoCaLoss

    classes = read_classes(dataset_dir)
    tokenize = CaptionTokenizer(load_config(settings.model.name)["text_cfg"]["context_length"], all_captions(classes))
    coca = build_coca(settings.model.name, vocab_size=tokenize.vocab_size)
    collate = _caption_collate(classes, tokenize, random.Random(settings.train.seed))
    augment = train_transform(coca.visual.image_size[0])
    train_set = IP102Dataset(dataset_dir, "train", augment)
    loader = DataLoader(train_set, batch_size=settings.train.batch_size, shuffle=True, drop_last=True, collate_fn=collate)
    coca_loss = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)  # open_clip's CoCa recipe

    def loss_fn(engine, batch):
        images, texts = batch
        contrastive, captioning = coca_loss(**engine(images, texts))
        return contrastive + captioning

    val_set = IP102Dataset(dataset_dir, "val", augment)
    val_loader = DataLoader(val_set, batch_size=settings.train.batch_size, collate_fn=collate)

    def score_fn(module) -> float:  # negative validation loss
        with torch.inference_mode():
            return -float(np.mean([sum(coca_loss(**module(i, t))).item() for i, t in val_loader]))

    fit(coca, loader, loss_fn, score_fn, cfg=settings.train, epochs=settings.train.pretrain_epochs,
        stage="coca", checkpoint_dir=checkpoint_dir)
    return coca


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Hinton et al.'s soft-target loss: KL divergence between temperature-softened outputs,
    scaled by T² so its gradients keep the size of the hard-label loss's."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.log_softmax(teacher_logits / temperature, dim=1),
                    log_target=True, reduction="batchmean") * temperature**2


def finetune_classifier(model: SpeciesClassifier, dataset_dir: Path, cfg: TrainConfig, *, epochs: int, stage: str,
                        checkpoint_dir: Path, teacher: torch.nn.Module | None = None) -> tuple[float, int]:
    """Cross-entropy fine-tuning on the species labels (plus distillation from `teacher` when
    given), early-stopped on validation top-1."""
    train_set = IP102Dataset(dataset_dir, "train", train_transform(model.image_size))
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def loss_fn(engine, batch):
        images, labels = batch
        logits = engine(images)
        if teacher is None:
            return criterion(logits, labels)
        with torch.no_grad():
            soft_targets = teacher(images)
        return criterion(logits, labels) + distillation_loss(logits, soft_targets)

    def score_fn(module) -> float:
        logits, labels = collect_logits(torch_predict_fn(module), dataset_dir, "val", module.image_size)
        loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
        # a small val split ties often on top-1; ties go to the lower loss
        return classification_metrics(logits, labels)["top1"] - 1e-3 * loss

    return fit(model, loader, loss_fn, score_fn, cfg=cfg, epochs=epochs, stage=stage, checkpoint_dir=checkpoint_dir)


def train(settings: Settings, dataset_dir: Path, out_dir: Path) -> TrainResult:
    """Both stages; logs params and per-epoch metrics to the active MLflow run.

    Args:
        settings: the shared configuration (model, train sections).
        dataset_dir: a dataset in the IP102 layout.
        out_dir: where checkpoints and the trained classifier are written.
    """
    seed_everything(settings.train.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    mlflow.log_params({"model": settings.model.name, **{f"train.{k}": v for k, v in settings.train.model_dump().items()}})
    mlflow.log_artifact(str(settings.train.deepspeed_config))
    coca = pretrain_coca(settings, dataset_dir, out_dir / "checkpoints")
    classifier = SpeciesClassifier.from_coca(coca, read_classes(dataset_dir))
    val_top1, epochs = finetune_classifier(classifier, dataset_dir, settings.train, epochs=settings.train.finetune_epochs,
                                           stage="classifier", checkpoint_dir=out_dir / "checkpoints")
    mlflow.log_metric("val_top1", val_top1)
    model_path = out_dir / "classifier.pt"
    torch.save(classifier, model_path)
    return TrainResult(model_path, val_top1, epochs)


def recovery_finetune(model: SpeciesClassifier, teacher: torch.nn.Module, dataset_dir: Path, settings: Settings,
                      cfg: PruneConfig, out_dir: Path) -> None:
    """A short fine-tune after pruning, distilled from the unpruned `teacher`."""
    finetune_classifier(model, dataset_dir, settings.train.model_copy(update={"lr": settings.train.lr / 3}),
                        epochs=cfg.finetune_epochs, stage="prune_finetune", checkpoint_dir=out_dir / "checkpoints",
                        teacher=teacher)
