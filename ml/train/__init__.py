"""Training through DeepSpeed: CoCa pretraining on image-caption pairs, then the species classifier.

`train()` runs in this process (rank 0 of 1) when `train.world_size` is 1, and otherwise starts
the `deepspeed` launcher (`python -m ml.train` on every rank: data parallel, on CPU with gloo or
on GPUs with NCCL, across the hosts of `train.hostfile` when given). Engine settings come from
`train.deepspeed_config` (ZeRO stage, precision), sizes from `config`; the global batch stays
`train.batch_size` at any world size. Only rank 0 logs to MLflow and writes the classifier.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler
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


@contextmanager
def _single_process_rank():
    """Let plain `python` act as rank 0 of 1 while DeepSpeed sets up (the deepspeed launcher sets
    these itself). They are removed again: this process's store keeps MASTER_PORT bound, and a
    subprocess that trains, started later, must not inherit it."""
    defaults = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(29500 + os.getpid() % 1000),
    }
    added = {key: value for key, value in defaults.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_rank0() -> bool:
    return _rank() == 0


def _log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    if is_rank0():  # the other ranks would each start runs of their own
        mlflow.log_metrics(metrics, step=step)


def _mean_over_ranks(value: float) -> float:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def _loader(dataset: Dataset, cfg: TrainConfig, **kwargs) -> DataLoader:
    """Shuffled batches of this rank's shard, batch_size / world_size each. At any world size the
    ranks' batches together hold the images one process would batch at that step: the sampler
    deals out one seeded permutation round-robin."""
    world = _world_size()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=_rank(), seed=cfg.seed, drop_last=True)
    return DataLoader(dataset, batch_size=max(1, cfg.batch_size // world), sampler=sampler, drop_last=True, **kwargs)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def deepspeed_engine(model: torch.nn.Module, cfg: TrainConfig, total_steps: int):
    """A DeepSpeed engine for `model`, with batch size, learning rate and schedule from `cfg`."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # late: importing it picks the accelerator from the environment set above

    ds_config = json.loads(Path(cfg.deepspeed_config).read_text())
    ds_config["train_micro_batch_size_per_gpu"] = max(1, cfg.batch_size // _world_size())
    ds_config["optimizer"]["params"].update(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if "scheduler" in ds_config:
        ds_config["scheduler"]["params"]["total_num_steps"] = max(1, total_steps)
        ds_config["scheduler"]["params"]["warmup_num_steps"] = max(1, min(total_steps // 10, 100))
    with _single_process_rank():
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config
        )
    return engine


def fit(
    model: torch.nn.Module,
    loader: DataLoader,
    loss_fn: LossFn,
    score_fn: ScoreFn,
    *,
    cfg: TrainConfig,
    epochs: int,
    stage: str,
    checkpoint_dir: Path,
) -> tuple[float, int]:
    """Train with early stopping on `score_fn`; the best epoch's weights are restored from its
    DeepSpeed checkpoint. Returns (best score, epochs run). Metrics go to the active MLflow run."""
    steps_per_epoch = min(len(loader), cfg.max_steps_per_epoch or len(loader))
    own_attributes = {id(obj): set(vars(obj)) for obj in [*model.parameters(), *model.modules()]}
    engine = deepspeed_engine(model, cfg, steps_per_epoch * epochs)
    best, best_epoch, epoch = -float("inf"), -1, 0
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        engine.train()
        losses = []
        batches = tqdm(
            loader, total=steps_per_epoch, desc=f"{stage} epoch {epoch + 1}/{epochs}", unit="batch", disable=not is_rank0()
        )
        for step, batch in enumerate(batches):
            if step == steps_per_epoch:
                break
            loss = loss_fn(engine, batch)
            engine.backward(loss)
            engine.step()
            losses.append(_mean_over_ranks(loss.item()))  # the loss of the whole (global) batch
            batches.set_postfix(loss=f"{np.mean(losses):.3f}")
        engine.eval()
        score = score_fn(engine.module)
        _log_metrics({f"{stage}_train_loss": float(np.mean(losses)), f"{stage}_val_score": score}, step=epoch)
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
    its forward hooks and the attributes ZeRO hung on each parameter and submodule (process groups
    and hook classes among them).
    Under ZeRO-3 each rank holds a slice of every weight: gather them whole first."""
    whole = None
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            whole = [p.data.detach().clone().float() for p in params]
    engine.destroy()
    if whole is not None:
        for param, data in zip(engine.module.parameters(), whole, strict=True):
            param.data = data
    for hook in (engine.module_forward_pre_hook, engine.module_forward_post_hook):
        if hook is not None:
            hook.remove()
    for obj in [*engine.module.parameters(), *engine.module.modules()]:
        for key in set(vars(obj)) - own_attributes.get(id(obj), set()):
            delattr(obj, key)


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
    loader = _loader(IP102Dataset(dataset_dir, "train", augment), settings.train, collate_fn=collate)
    coca_loss = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)  # open_clip's CoCa recipe
    # across ranks, every image is contrasted with every caption of the global batch, as in one process
    global_coca_loss = CoCaLoss(
        caption_loss_weight=2.0, clip_loss_weight=1.0, gather_with_grad=True, rank=_rank(), world_size=_world_size()
    )

    def loss_fn(engine, batch):
        images, texts = batch
        contrastive, captioning = global_coca_loss(**engine(images, texts))
        return contrastive + captioning

    val_set = IP102Dataset(dataset_dir, "val", augment)
    val_loader = DataLoader(val_set, batch_size=settings.train.batch_size, collate_fn=collate)

    def score_fn(module) -> float:  # negative validation loss
        with torch.inference_mode():
            return -float(np.mean([sum(coca_loss(**module(i, t))).item() for i, t in val_loader]))

    fit(
        coca,
        loader,
        loss_fn,
        score_fn,
        cfg=settings.train,
        epochs=settings.train.pretrain_epochs,
        stage="coca",
        checkpoint_dir=checkpoint_dir,
    )
    return coca


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Hinton et al.'s soft-target loss: KL divergence between temperature-softened outputs,
    scaled by T² so its gradients keep the size of the hard-label loss's."""
    return (
        F.kl_div(
            F.log_softmax(student_logits / temperature, dim=1),
            F.log_softmax(teacher_logits / temperature, dim=1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
    )


def finetune_classifier(
    model: SpeciesClassifier,
    dataset_dir: Path,
    cfg: TrainConfig,
    *,
    epochs: int,
    stage: str,
    checkpoint_dir: Path,
    teacher: torch.nn.Module | None = None,
) -> tuple[float, int]:
    """Cross-entropy fine-tuning on the species labels (plus distillation from `teacher` when
    given), early-stopped on validation top-1."""
    loader = _loader(IP102Dataset(dataset_dir, "train", train_transform(model.image_size)), cfg)
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
    """Both stages, logging params and per-epoch metrics to the active MLflow run: here, or on
    `train.world_size` processes (or `train.hostfile`'s hosts) through the deepspeed launcher.

    Args:
        settings: the shared configuration (model, train sections).
        dataset_dir: a dataset in the IP102 layout.
        out_dir: where checkpoints and the trained classifier are written.
    """
    if settings.train.world_size == 1 and settings.train.hostfile is None:
        return train_here(settings, dataset_dir, out_dir)
    return _launch(settings, dataset_dir, out_dir)


def train_here(settings: Settings, dataset_dir: Path, out_dir: Path) -> TrainResult:
    """This process's part of `train`: all of it, or one rank's under the launcher."""
    seed_everything(settings.train.seed)
    local_processes = int(os.environ.get("LOCAL_SIZE", "1"))  # set by the launcher
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes))
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_rank0():
        mlflow.log_params({"model": settings.model.name, **{f"train.{k}": v for k, v in settings.train.model_dump().items()}})
        mlflow.log_artifact(str(settings.train.deepspeed_config))
    coca = pretrain_coca(settings, dataset_dir, out_dir / "checkpoints")
    classifier = SpeciesClassifier.from_coca(coca, read_classes(dataset_dir))
    val_top1, epochs = finetune_classifier(
        classifier,
        dataset_dir,
        settings.train,
        epochs=settings.train.finetune_epochs,
        stage="classifier",
        checkpoint_dir=out_dir / "checkpoints",
    )
    _log_metrics({"val_top1": val_top1})
    result = TrainResult(out_dir / "classifier.pt", val_top1, epochs)
    if is_rank0():
        torch.save(classifier, result.model_path)
        (out_dir / "result.json").write_text(json.dumps({"val_top1": val_top1, "epochs_run": epochs}))
    return result


def _launch(settings: Settings, dataset_dir: Path, out_dir: Path) -> TrainResult:
    """`deepspeed [--hostfile H | --num_gpus N] --module ml.train`: rank 0 logs into this
    process's active MLflow run and leaves result.json next to the classifier."""
    cfg = settings.train
    hosts = ["--hostfile", str(cfg.hostfile)] if cfg.hostfile else ["--num_gpus", str(cfg.world_size)]
    out_dir.mkdir(parents=True, exist_ok=True)
    settings_file = out_dir / "settings.json"  # every rank trains with exactly these settings
    settings_file.touch(mode=0o600)  # they may hold database passwords
    settings_file.write_text(settings.model_dump_json())
    command = [
        shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed",
        *hosts,
        "--master_port",
        str(cfg.master_port),
        "--no_local_rank",
        "--module",
        "ml.train",
        str(dataset_dir),
        str(out_dir),
        str(settings_file),
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "PYTHONPATH": str(Path(__file__).parents[2])}
    if active := mlflow.active_run():
        env["MLFLOW_RUN_ID"] = active.info.run_id
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    (out_dir / "result.json").unlink(missing_ok=True)
    subprocess.run(command, env=env, check=True)
    result = json.loads((out_dir / "result.json").read_text())
    return TrainResult(out_dir / "classifier.pt", result["val_top1"], result["epochs_run"])


def recovery_finetune(
    model: SpeciesClassifier, teacher: torch.nn.Module, dataset_dir: Path, settings: Settings, cfg: PruneConfig, out_dir: Path
) -> None:
    """A short fine-tune after pruning, distilled from the unpruned `teacher`."""
    seed_everything(settings.train.seed)  # the same pruned weights from the same inputs, in any process
    finetune_classifier(
        model,
        dataset_dir,
        settings.train.model_copy(update={"lr": settings.train.lr / 3}),
        epochs=cfg.finetune_epochs,
        stage="prune_finetune",
        checkpoint_dir=out_dir / "checkpoints",
        teacher=teacher,
    )
