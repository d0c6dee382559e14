"""The train stage, through DeepSpeed: CoCa pretraining on image-caption pairs (`coca`), then the
species classifier on its image encoder (`classifier`).

`train()` runs in this process (rank 0 of 1) when `train.world_size` is 1, and otherwise starts
the `deepspeed` launcher (`launch`: `ml.train.rank` on every rank, data parallel, on CPU with gloo
or on GPUs with NCCL, across the hosts of `train.hostfile` when given). Engine settings come from
`train.deepspeed_config` (ZeRO stage, precision), sizes from `config`; the global batch stays
`train.batch_size` at any world size. Only rank 0 logs to MLflow and writes the classifier.

Given `warm_start` (weights an earlier train stage left, with their species), a retrain on the
same species skips pretraining and fine-tunes those weights for `train.warm_start_epochs`, with
the model it starts from as a teacher on the base images (distillation: learning without
forgetting, Li & Hoiem 2016), so the lab is kept while users' photos teach the field; with other
species it starts from scratch. Feedback images are drawn `train.feedback_weight` times as often
as base images (`classifier.sampling_weights`).
Command line: `python -m ml.train --out-dir D [--dataset-dir DS] [--run-id ID] [--warm-start W]`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from config import Settings
from ml.data import read_classes
from ml.data.versions import verify
from ml.model import SpeciesClassifier, build_coca
from ml.results import WARM_START_ARTIFACT, TrainResult
from ml.tracking import NO_RUN, RunLog
from ml.train.classifier import finetune_classifier
from ml.train.coca import pretrain_coca
from ml.train.engine import is_rank0, seed_everything


def train(
    settings: Settings, *, dataset_dir: Path, out_dir: Path, run: RunLog = NO_RUN, warm_start: Path | None = None
) -> TrainResult:
    """Both training stages on the dataset at `dataset_dir`, here or through the deepspeed
    launcher; checkpoints, the classifier (`classifier.pt`) and its weights go to `out_dir`. A
    dataset version whose files changed since it was sealed is refused first (TamperedVersionError):
    validation checked it, but the files may have changed since."""
    verify(dataset_dir)
    if settings.train.world_size == 1 and settings.train.hostfile is None:
        return train_here(settings, dataset_dir=dataset_dir, out_dir=out_dir, run=run, warm_start=warm_start)
    from ml.train.launch import launch

    return launch(settings, dataset_dir=dataset_dir, out_dir=out_dir, run=run, warm_start=warm_start)


def warm_classifier(model_name: str, classes: list[str], weights_path: Path) -> SpeciesClassifier | None:
    """The classifier an earlier train stage saved, or None when it knew other species."""
    saved = torch.load(weights_path, weights_only=True)  # tensors, strings and lists: no pickled code
    if saved["classes"] != classes:
        return None
    classifier = SpeciesClassifier.from_coca(build_coca(model_name), classes)
    classifier.load_state_dict(saved["state_dict"])
    return classifier


def train_here(
    settings: Settings, *, dataset_dir: Path, out_dir: Path, run: RunLog = NO_RUN, warm_start: Path | None = None
) -> TrainResult:
    """This process's part of `train`: all of it, or one rank's under the launcher."""
    run = run if is_rank0() else NO_RUN  # the other ranks would log every metric again
    cfg = settings.train
    seed_everything(cfg.seed)
    local_processes = int(os.environ.get("LOCAL_SIZE", "1"))  # set by the launcher
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes))
    out_dir.mkdir(parents=True, exist_ok=True)
    run.params({"model": settings.model.name, **{f"train.{k}": v for k, v in cfg.model_dump().items()}})
    run.artifact(cfg.deepspeed_config)
    checkpoints, classes = out_dir / "checkpoints", read_classes(dataset_dir)
    warm = warm_classifier(settings.model.name, classes, warm_start) if warm_start else None
    run.params({"train.started_from": "champion" if warm else "scratch"})
    if warm is None:
        coca = pretrain_coca(settings, dataset_dir, checkpoints, run)
        classifier, epochs, teacher = SpeciesClassifier.from_coca(coca, classes), cfg.finetune_epochs, None
    else:  # the champion teaches what it knew on the base images, users' photos the rest
        classifier, epochs, teacher = warm, cfg.warm_start_epochs, copy.deepcopy(warm).eval()
        # every epoch runs: val dips in the first ones, at the learning rate's peak, before it recovers
        cfg = cfg.model_copy(update={"patience": epochs})
    val_top1, epochs_run = finetune_classifier(
        classifier,
        dataset_dir,
        cfg,
        epochs=epochs,
        stage="classifier",
        checkpoint_dir=checkpoints,
        teacher=teacher,
        teach_users_photos=False,
        run=run,
    )
    run.metrics({"val_top1": val_top1})
    result = TrainResult(model_path=out_dir / "classifier.pt", val_top1=val_top1, epochs_run=epochs_run)
    if is_rank0():
        torch.save(classifier, result.model_path)
        weights = out_dir / Path(WARM_START_ARTIFACT).name
        torch.save({"classes": classes, "state_dict": classifier.state_dict()}, weights)
        run.artifact(weights, str(Path(WARM_START_ARTIFACT).parent))
        result.save(out_dir)
    return result
