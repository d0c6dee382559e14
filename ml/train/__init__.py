"""The train stage, through DeepSpeed: CoCa pretraining on image-caption pairs (`coca`), then the
species classifier on its image encoder (`classifier`).

`train()` runs in this process (rank 0 of 1) when `train.world_size` is 1, and otherwise starts
the `deepspeed` launcher (`launch`: `ml.train.rank` on every rank, data parallel, on CPU with gloo
or on GPUs with NCCL, across the hosts of `train.hostfile` when given). Engine settings come from
`train.deepspeed_config` (ZeRO stage, precision), sizes from `config`; the global batch stays
`train.batch_size` at any world size. Only rank 0 logs to MLflow and writes the classifier.
Command line: `python -m ml.train --out-dir D [--dataset-dir DS] [--run-id ID]`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from config import Settings
from ml.data import read_classes
from ml.model import SpeciesClassifier
from ml.results import TrainResult
from ml.tracking import NO_RUN, RunLog
from ml.train.classifier import finetune_classifier
from ml.train.coca import pretrain_coca
from ml.train.engine import is_rank0, seed_everything


def train(settings: Settings, *, dataset_dir: Path, out_dir: Path, run: RunLog = NO_RUN) -> TrainResult:
    """Both training stages on the dataset at `dataset_dir`, here or through the deepspeed
    launcher; checkpoints and the classifier (`classifier.pt`) go to `out_dir`."""
    if settings.train.world_size == 1 and settings.train.hostfile is None:
        return train_here(settings, dataset_dir=dataset_dir, out_dir=out_dir, run=run)
    from ml.train.launch import launch

    return launch(settings, dataset_dir=dataset_dir, out_dir=out_dir, run=run)


def train_here(settings: Settings, *, dataset_dir: Path, out_dir: Path, run: RunLog = NO_RUN) -> TrainResult:
    """This process's part of `train`: all of it, or one rank's under the launcher."""
    run = run if is_rank0() else NO_RUN  # the other ranks would log every metric again
    seed_everything(settings.train.seed)
    local_processes = int(os.environ.get("LOCAL_SIZE", "1"))  # set by the launcher
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes))
    out_dir.mkdir(parents=True, exist_ok=True)
    run.params({"model": settings.model.name, **{f"train.{k}": v for k, v in settings.train.model_dump().items()}})
    run.artifact(settings.train.deepspeed_config)
    checkpoints = out_dir / "checkpoints"
    coca = pretrain_coca(settings, dataset_dir, checkpoints, run)
    classifier = SpeciesClassifier.from_coca(coca, read_classes(dataset_dir))
    cfg = settings.train
    val_top1, epochs = finetune_classifier(
        classifier, dataset_dir, cfg, epochs=cfg.finetune_epochs, stage="classifier", checkpoint_dir=checkpoints, run=run
    )
    run.metrics({"val_top1": val_top1})
    result = TrainResult(model_path=out_dir / "classifier.pt", val_top1=val_top1, epochs_run=epochs)
    if is_rank0():
        torch.save(classifier, result.model_path)
        result.save(out_dir)
    return result
