"""Training stage 2: the species classifier on CoCa's image encoder, fine-tuned on the labels
(and, after pruning, distilled from the unpruned model)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from config import TrainConfig
from ml.data import IP102Dataset, train_transform
from ml.data.versions import feedback_files
from ml.evaluate import classification_metrics, collect_logits
from ml.model import SpeciesClassifier
from ml.runtime import eager_predict_fn
from ml.tracking import NO_RUN, RunLog
from ml.train.engine import fit, placement, shard_loader


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


class TrainImages(Dataset):
    """The train split as (image, label, whether a user sent it)."""

    def __init__(self, dataset_dir: Path, image_size: int):
        self.images = IP102Dataset(dataset_dir, "train", train_transform(image_size))
        sent = feedback_files(dataset_dir, "train")
        self.from_user = torch.tensor([name in sent for name, _ in self.images.items])
        self.labels = torch.tensor([label for _, label in self.images.items], dtype=torch.long)
        self.num_classes = len(self.images.classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool]:
        return *self.images[index], bool(self.from_user[index])


def sampling_weights(images: TrainImages, cfg: TrainConfig) -> torch.Tensor | None:
    """How often each train image is drawn: users' images `feedback_weight` times as often as
    base images and, with `balance_classes`, every class as often as any other. None: uniformly."""
    weights = torch.where(images.from_user, cfg.feedback_weight, 1.0)
    if cfg.balance_classes:
        weights /= torch.zeros(images.num_classes).index_add_(0, images.labels, weights)[images.labels]
    return None if torch.all(weights == weights[0]) else weights


def finetune_classifier(
    model: SpeciesClassifier,
    dataset_dir: Path,
    cfg: TrainConfig,
    *,
    epochs: int,
    stage: str,
    checkpoint_dir: Path,
    teacher: torch.nn.Module | None = None,
    teach_users_photos: bool = True,
    run: RunLog = NO_RUN,
) -> tuple[float, int]:
    """Cross-entropy fine-tuning on the species labels, early-stopped on validation top-1, plus
    distillation from `teacher` when given: on every image, or with `teach_users_photos` off only
    on the base images (a champion teaching what it knew, not the answers users corrected)."""
    images = TrainImages(dataset_dir, model.image_size)
    loader = shard_loader(images, cfg, weights=sampling_weights(images, cfg))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    if teacher is not None:  # it reads the student's batches, as they are placed for the engine
        teacher.to(*placement(cfg))

    def loss_fn(engine, batch):
        images, labels, from_user = batch
        logits = engine(images)
        taught = torch.ones_like(from_user) if teach_users_photos else ~from_user
        if teacher is None or not taught.any():
            return criterion(logits, labels)
        with torch.no_grad():
            soft_targets = teacher(images[taught])
        return criterion(logits, labels) + distillation_loss(logits[taught], soft_targets)

    def score_fn(module) -> float:
        logits, labels = collect_logits(eager_predict_fn(module), dataset_dir, "val", module.image_size)
        loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
        # a small val split ties often on top-1; ties go to the lower loss
        return classification_metrics(logits, labels)["top1"] - 1e-3 * loss

    return fit(model, loader, loss_fn, score_fn, cfg=cfg, epochs=epochs, stage=stage, checkpoint_dir=checkpoint_dir, run=run)
