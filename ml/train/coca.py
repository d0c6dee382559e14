"""Training stage 1: CoCa pretrained on (image, templated species caption) pairs."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from open_clip.coca_model import CoCa
from torch.utils.data import DataLoader, Dataset

from config import Settings
from ml.data import IP102Dataset, all_captions, caption, eval_transform, read_classes, train_transform
from ml.model import CaptionTokenizer, build_coca, load_config
from ml.tracking import NO_RUN, RunLog
from ml.train.engine import SeededDraws, fit, placed, placement, rank, shard_loader, world_size


class CaptionedImages(Dataset):
    """A split's images, each with a templated caption of its species. The template is drawn with
    torch's generator, which the loader seeds per draw (engine.SeededDraws) as for the transforms."""

    def __init__(self, images: IP102Dataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        image, label = self.images[index]
        return image, caption(self.images.classes[label], random.Random(torch.randint(2**62, ()).item()))


def _tokenized(tokenize):
    def collate(items):
        return torch.stack([image for image, _ in items]), tokenize([text for _, text in items])

    return collate


def pretrain_coca(settings: Settings, dataset_dir: Path, checkpoint_dir: Path, run: RunLog = NO_RUN) -> CoCa:
    """Stage 1: CoCa on (image, templated species caption) pairs, contrastive + captioning loss."""
    from open_clip.loss import CoCaLoss

    classes = read_classes(dataset_dir)
    tokenize = CaptionTokenizer(load_config(settings.model.name)["text_cfg"]["context_length"], all_captions(classes))
    coca = build_coca(settings.model.name, vocab_size=tokenize.vocab_size)
    size, collate = coca.visual.image_size[0], _tokenized(tokenize)
    train_set = CaptionedImages(IP102Dataset(dataset_dir, "train", train_transform(size)))
    loader = shard_loader(train_set, settings.train, collate_fn=collate)
    coca_loss = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)  # open_clip's CoCa recipe
    # across ranks, every image is contrasted with every caption of the global batch, as in one process
    global_coca_loss = CoCaLoss(
        caption_loss_weight=2.0, clip_loss_weight=1.0, gather_with_grad=True, rank=rank(), world_size=world_size()
    )

    def loss_fn(engine, batch):
        images, texts = batch
        contrastive, captioning = global_coca_loss(**engine(images, texts))
        return contrastive + captioning

    # the same captions every epoch (draw i seeded with i), the images unaugmented: a score that moves with the model only
    val_set = SeededDraws(CaptionedImages(IP102Dataset(dataset_dir, "val", eval_transform(size))))
    val_draws = [(i, i) for i in range(len(val_set))]
    val_loader = DataLoader(val_set, batch_size=settings.train.batch_size, sampler=val_draws, collate_fn=collate)

    where = placement(settings.train)

    def score_fn(module) -> float:  # negative validation loss
        with torch.inference_mode():
            return -float(np.mean([sum(coca_loss(**module(*placed(batch, *where)))).item() for batch in val_loader]))

    fit(
        coca,
        loader,
        loss_fn,
        score_fn,
        cfg=settings.train,
        epochs=settings.train.pretrain_epochs,
        stage="coca",
        checkpoint_dir=checkpoint_dir,
        run=run,
    )
    return coca
