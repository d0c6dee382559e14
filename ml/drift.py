"""Has what the model is shown moved away from what it was trained for?

Black-box shift detection (Lipton et al. 2018): the model's softmax outputs stand for each image,
which Rabanser et al. ("Failing Loudly", 2019) found the most reliable representation across
kinds of shift. Two sets of them are compared with the maximum mean discrepancy (Gretton et al.
2012), Gaussian kernel, bandwidth by the median heuristic, p-value by permutation: under no
drift, p is uniform, so p < alpha flags a drift-free window with probability alpha.

The reference is the lab images the model never trained on (val and test): its outputs on its
own training images are more confident than on any new image, drifted or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial.distance import cdist
from scipy.special import softmax

from ml.evaluate import collect_logits
from ml.runtime import PredictFn

REFERENCE_SPLITS = ("val", "test")


@dataclass(frozen=True)
class DriftTest:
    mmd2: float  # squared MMD (biased estimate) between reference and current
    p_value: float
    # Per current image, the MMD witness: its mean kernel to the current images minus to the
    # reference. The highest are the least like the training set: worth a labeler's look first.
    witness: np.ndarray

    def drifted(self, alpha: float) -> bool:
        return self.p_value < alpha


def reference_logits(predict: PredictFn, dataset_dir: Path, image_size: int) -> np.ndarray:
    return np.concatenate([collect_logits(predict, dataset_dir, split, image_size)[0] for split in REFERENCE_SPLITS])


def mmd_test(reference_logits: np.ndarray, current_logits: np.ndarray, permutations: int = 1000, seed: int = 0) -> DriftTest:
    """The MMD two-sample test on the softmax outputs of two sets of images."""
    pooled = softmax(np.concatenate([reference_logits, current_logits]), axis=1)
    n, m = len(reference_logits), len(current_logits)
    distances = cdist(pooled, pooled, "sqeuclidean")
    median = np.median(distances[np.triu_indices(n + m, k=1)])
    kernel = np.exp(-distances / (median if median > 0 else 1.0))
    # MMD² = sᵀ K s with s = 1/m on current images and -1/n on reference ones: every permutation
    # of the labels is one more s
    signs = np.r_[np.full(n, -1.0 / n), np.full(m, 1.0 / m)]
    rng = np.random.default_rng(seed)
    shuffled = np.stack([rng.permutation(signs) for _ in range(permutations)])
    null = np.einsum("pi,ij,pj->p", shuffled, kernel, shuffled)
    observed = float(signs @ kernel @ signs)
    witness = kernel[n:, n:].mean(axis=1) - kernel[n:, :n].mean(axis=1)
    return DriftTest(mmd2=observed, p_value=float((1 + np.sum(null >= observed)) / (1 + permutations)), witness=witness)
