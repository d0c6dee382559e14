"""Read a dataset in the IP102 layout from any path: the real IP102 or the synthetic one.

root/images/NAME.jpg
root/train.txt, val.txt, test.txt   lines "NAME.jpg LABEL" (labels from 0)
root/classes.txt                    lines "N name" (IP102, N from 1) or just "name"
root/field.txt                      (dataset versions only) users' corrected photos held out of
                                    training: the field slice models are scored and gated on
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

SPLITS = ("train", "val", "test")
FIELD_SPLIT = "field"
# Image sides a dataset may hold, in pixels (thumbnails and panoramas are both data errors): the
# Great Expectations suite checks them, and the service refuses feedback outside them.
MIN_SIDE, MAX_SIDE = 16, 10_000
IP102_CLASSES_FILE = Path(__file__).with_name("ip102_classes.txt")


def read_classes(root: Path) -> list[str]:
    """Species names in label order."""
    names = []
    for line in (root / "classes.txt").read_text().splitlines():
        number, _, rest = line.strip().partition(" ")
        names.append(rest.strip() if number.isdigit() and rest else line.strip())
    return [n for n in names if n]


def splits_of(root: Path) -> tuple[str, ...]:
    """The dataset's splits: IP102's three, and the field holdout where a version has one."""
    return (*SPLITS, FIELD_SPLIT) if (root / f"{FIELD_SPLIT}.txt").is_file() else SPLITS


def held_out_splits(root: Path) -> tuple[str, ...]:
    """The splits training must never see."""
    return tuple(split for split in splits_of(root) if split != "train")


def read_split(root: Path, split: str, optional: bool = False) -> list[tuple[str, int]]:
    """(file name, label) pairs of one split file; a malformed line raises with its number. An
    `optional` split (the field holdout, which only versions have) may be missing: no pairs."""
    path = root / f"{split}.txt"
    if optional and not path.is_file():
        return []
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{root / f'{split}.txt'}:{number}: expected 'NAME.jpg LABEL', got {line!r}")
        pairs.append((parts[0], int(parts[1])))
    return pairs


def manifest(root: Path) -> pd.DataFrame:
    """One row per (split, image): file, absolute path, label, and the image bytes' sha256."""
    rows = []
    for split in splits_of(root):
        for name, label in read_split(root, split):
            path = root / "images" / name
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            rows.append({"split": split, "file": name, "path": str(path), "label": label, "sha256": digest})
    return pd.DataFrame(rows, columns=["split", "file", "path", "label", "sha256"])


def dataset_digest(table: pd.DataFrame, classes: list[str]) -> str:
    """Content digest of a dataset version: splits, labels, image bytes and class names."""
    h = hashlib.sha256("\n".join(classes).encode())
    for row in table.sort_values(["split", "file"]).itertuples():
        h.update(f"{row.split} {row.file} {row.label} {row.sha256}\n".encode())
    return h.hexdigest()


class IP102Dataset(Dataset):
    """Images and labels of one split; `transform` maps a PIL image to a tensor."""

    def __init__(self, root: Path, split: str, transform=None):
        self.root = Path(root)
        self.items = read_split(self.root, split)
        self.classes = read_classes(self.root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        name, label = self.items[index]
        with Image.open(self.root / "images" / name) as image:
            rgb = image.convert("RGB")
        return (self.transform(rgb) if self.transform else rgb), label
