"""Datasets in the IP102 layout: the loader, the synthetic generator and caption templates."""

from ml.data.captions import all_captions, caption
from ml.data.ip102 import SPLITS, IP102Dataset, dataset_digest, manifest, read_classes, read_split
from ml.data.transforms import eval_transform, train_transform

__all__ = [
    "SPLITS",
    "IP102Dataset",
    "all_captions",
    "caption",
    "dataset_digest",
    "eval_transform",
    "manifest",
    "read_classes",
    "read_split",
    "train_transform",
]
