"""Each pending feedback row checked on its own before it may enter a dataset version: one bad
upload is quarantined with its reason instead of failing the whole version, forever.

A re-encoded or resized copy of a val/test image is caught by a perceptual hash (a 16 x 16
difference hash): on the demo's dataset, copies re-encoded down to JPEG quality 30 stayed within
18 of its 256 bits and distinct images were at least 26 apart.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from ml.data import read_split
from ml.data.ip102 import MAX_SIDE, MIN_SIDE, held_out_splits

NEAR_DUPLICATE_BITS = 20


def difference_hash(image: Image.Image, size: int = 16) -> int:
    """Whether each pixel of a small grey copy is brighter than its right neighbour, as bits."""
    small = np.asarray(image.convert("L").resize((size + 1, size), Image.Resampling.LANCZOS), dtype=np.int16)
    return int.from_bytes(np.packbits(small[:, 1:] > small[:, :-1]).tobytes(), "big")


def held_out_hashes(dataset: Path) -> list[int]:
    """The hashes of a dataset's val, test and field images, which training must never see."""
    hashes = []
    for split in held_out_splits(dataset):
        for name, _ in read_split(dataset, split):
            with Image.open(dataset / "images" / name) as image:
                hashes.append(difference_hash(image))
    return hashes


def rejection(data: bytes | None, label: str, classes: list[str], held_out: list[int]) -> str | None:
    """Why this image and label may not train, or None when they may."""
    if data is None:
        return "the image is missing from the store"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            width, height = image.size
            image_hash = difference_hash(image)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        return f"the image does not decode: {error}"
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        return f"the image is {width}x{height} px; a dataset takes sides from {MIN_SIDE} to {MAX_SIDE} px"
    if label not in classes:
        return f"unknown species {label!r}"
    if any((image_hash ^ other).bit_count() <= NEAR_DUPLICATE_BITS for other in held_out):
        return "a near-duplicate of a val/test image (it would leak into the scores)"
    return None
