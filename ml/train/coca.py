"""Training stage 1: CoCa pretrained on (image, templated species caption) pairs."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from open_clip.coca_model import CoCa
from torch.utils.data import DataLoader

from config import Settings
from ml.data import IP102Dataset, all_captions, caption, read_classes, train_transform
from ml.model import CaptionTokenizer, build_coca, load_config
from ml.tracking import NO_RUN, RunLog
from ml.train.engine import fit, placed, placement, rank, shard_loader, world_size


def _caption_collate(classes: list[str], tokenize, rng: random.Random):
    def collate(items):
        images = torch.stack([image for image, _ in items])
        texts = tokenize([caption(classes[label], rng) for _, label in items])
        return images, texts

    return collate


def pretrain_coca(settings: Settings, dataset_dir: Path, checkpoint_dir: Path, run: RunLog = NO_RUN) -> CoCa:
    """Stage 1: CoCa on (image, templated species caption) pairs, contrastive + captioning loss."""
    from open_clip.loss import CoCaLoss

    classes = read_classes(dataset_dir)
    tokenize = CaptionTokenizer(load_config(settings.model.name)["text_cfg"]["context_length"], all_captions(classes))
    coca = build_coca(settings.model.name, vocab_size=tokenize.vocab_size)
    collate = _caption_collate(classes, tokenize, random.Random(settings.train.seed))
    augment = train_transform(coca.visual.image_size[0])
    loader = shard_loader(IP102Dataset(dataset_dir, "train", augment), settings.train, collate_fn=collate)
    coca_loss = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)  # open_clip's CoCa recipe
    # across ranks, every image is contrasted with every caption of the global batch, as in one process
    global_coca_loss = CoCaLoss(
        caption_loss_weight=2.0, clip_loss_weight=1.0, gather_with_grad=True, rank=rank(), world_size=world_size()
    )

    def loss_fn(engine, batch):
        images, texts = batch
        contrastive, captioning = global_coca_loss(**engine(images, texts))
        return contrastive + captioning

    val_set = IP102Dataset(dataset_dir, "val", augment)
    val_loader = DataLoader(val_set, batch_size=settings.train.batch_size, collate_fn=collate)

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
