"""The drift test (ml/drift.py) on softmax outputs drawn from known distributions."""

import numpy as np
from sklearn.metrics import roc_auc_score

from ml.drift import mmd_test

CLASSES = 10


def _logits(rng: np.random.Generator, count: int, shift: float = 0.0) -> np.ndarray:
    """A model's logits; `shift` makes it more sure of class 0, as a change of input would."""
    logits = rng.normal(0, 2, (count, CLASSES))
    logits[:, 0] += shift
    return logits


def test_a_shift_is_flagged_and_the_same_distribution_is_not():
    rng = np.random.default_rng(0)
    reference = _logits(rng, 300)
    assert mmd_test(reference, _logits(rng, 150)).p_value > 0.05
    assert mmd_test(reference, _logits(rng, 150, shift=3.0)).p_value < 0.01


def test_false_alarms_are_about_as_rare_as_alpha():
    """Under no drift the p-value is uniform: about 5 windows in 100 fall below 0.05. A reference
    that differs from new lab images (the training images, say) would flag far more."""
    rng = np.random.default_rng(1)
    p_values = [mmd_test(_logits(rng, 100), _logits(rng, 60), permutations=200, seed=i).p_value for i in range(100)]
    assert np.mean(np.array(p_values) < 0.05) <= 0.12
    assert np.mean(np.array(p_values) > 0.5) >= 0.35  # not stuck near 1 either: a test that never flags fails


def test_the_witness_ranks_the_shifted_images_first():
    rng = np.random.default_rng(2)
    current = np.concatenate([_logits(rng, 100), _logits(rng, 50, shift=4.0)])
    test = mmd_test(_logits(rng, 300), current)
    assert roc_auc_score(np.arange(150) >= 100, test.witness) >= 0.8  # 0.5: no better than a random order
