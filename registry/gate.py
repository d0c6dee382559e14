"""The gate: does a retrained model replace the champion? Judged on the same images, so every
comparison is paired, and only on differences noise cannot explain.

A candidate is promoted when, against the champion,
1. it is not worse on the lab slice: the lower end of a paired bootstrap interval of the top-1
   difference is above `-lab_margin` (non-inferiority);
2. it is better where users take photos: an exact one-sided McNemar test on the images one of
   the two gets right and the other wrong gives p < `alpha` on the field slice (on the lab
   slice while the field slice is smaller than `min_field_images`);
3. no class with at least `min_class_images` images loses more than `max_class_recall_drop`
   of its recall on any slice.
The first model (no champion) is promoted. Pure functions: registry/__init__.py records them.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel
from scipy.stats import binomtest

from config import GateConfig
from ml.results import SliceScores


class GateDecision(BaseModel):
    promoted: bool
    reasons: list[str]  # every failed check, in words; empty when promoted
    improvement_slice: str | None  # where the improvement was tested
    checks: dict[str, dict]  # the statistics behind each check


def correctness(scores: SliceScores) -> np.ndarray:
    return np.array(scores.predicted) == np.array(scores.labels)


def paired_bootstrap(candidate: np.ndarray, champion: np.ndarray, cfg: GateConfig) -> dict[str, float]:
    """Top-1 difference (candidate - champion) and its (1 - 2 alpha) percentile interval over
    resamples of the same images for both models."""
    rng = np.random.default_rng(0)  # the same decision for the same answers
    picks = rng.integers(0, len(candidate), (cfg.bootstrap_samples, len(candidate)))
    differences = candidate[picks].mean(1) - champion[picks].mean(1)
    lower, upper = np.quantile(differences, [cfg.alpha, 1 - cfg.alpha])
    return {"difference": float(candidate.mean() - champion.mean()), "lower": float(lower), "upper": float(upper)}


def mcnemar(candidate: np.ndarray, champion: np.ndarray) -> dict[str, float]:
    """Exact one-sided McNemar: among images exactly one model gets right, does the candidate
    win more often than a fair coin would?"""
    wins, losses = int(np.sum(candidate & ~champion)), int(np.sum(~candidate & champion))
    p_value = binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue if wins + losses else 1.0
    return {"wins": wins, "losses": losses, "p_value": float(p_value)}


def class_recall_drops(candidate: SliceScores, champion: SliceScores, cfg: GateConfig) -> dict[int, float]:
    """Recall lost per class, for classes with enough images in the slice to judge."""
    support = np.bincount(np.array(candidate.labels), minlength=len(candidate.class_recall))
    return {
        label: round(before - after, 4)
        for label, (after, before) in enumerate(zip(candidate.class_recall, champion.class_recall, strict=True))
        if after is not None and before is not None and support[label] >= cfg.min_class_images
    }


def decide(candidate: dict[str, SliceScores], champion: dict[str, SliceScores] | None, cfg: GateConfig) -> GateDecision:
    if champion is None:
        return GateDecision(promoted=True, reasons=[], improvement_slice=None, checks={})
    for name in candidate.keys() & champion.keys():
        if candidate[name].labels != champion[name].labels:
            raise ValueError(f"the {name} slice of the candidate and the champion are not the same images")
    reasons, checks = [], {}
    lab = paired_bootstrap(correctness(candidate["lab"]), correctness(champion["lab"]), cfg)
    checks["lab_non_inferiority"] = {**lab, "margin": cfg.lab_margin}
    if lab["lower"] <= -cfg.lab_margin:
        reasons.append(
            f"lab top-1 may be worse by more than {cfg.lab_margin:.2f} "
            f"(difference {lab['difference']:+.3f}, lower bound {lab['lower']:+.3f})"
        )
    field_size = len(candidate["field"].labels) if "field" in candidate and "field" in champion else 0
    improvement_slice = "field" if field_size >= cfg.min_field_images else "lab"
    gain = mcnemar(correctness(candidate[improvement_slice]), correctness(champion[improvement_slice]))
    checks["improvement"] = {**gain, "slice": improvement_slice, "alpha": cfg.alpha}
    if gain["p_value"] >= cfg.alpha:
        reasons.append(
            f"no significant improvement on the {improvement_slice} slice "
            f"({gain['wins']} images won, {gain['losses']} lost, p = {gain['p_value']:.3f} >= {cfg.alpha})"
        )
    for name in candidate.keys() & champion.keys():
        drops = class_recall_drops(candidate[name], champion[name], cfg)
        regressed = {label: drop for label, drop in drops.items() if drop > cfg.max_class_recall_drop}
        checks[f"class_recall_{name}"] = {"worst_drop": max(drops.values(), default=0.0), "regressed": regressed}
        if regressed:
            reasons.append(
                f"on the {name} slice class(es) {sorted(regressed)} lost more than {cfg.max_class_recall_drop:.2f} recall"
            )
    return GateDecision(promoted=not reasons, reasons=reasons, improvement_slice=improvement_slice, checks=checks)
