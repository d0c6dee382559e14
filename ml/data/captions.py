"""Captions for CoCa pretraining, built from species names with templates."""

from __future__ import annotations

import random

TEMPLATES = (
    "a photo of a {}.",
    "a close-up photo of a {}, an insect pest.",
    "a {} on a leaf.",
    "a field photo of the pest {}.",
    "an insect called {}.",
)


def caption(species: str, rng: random.Random) -> str:
    """One randomly templated caption, so the decoder learns the name, not the sentence."""
    return rng.choice(TEMPLATES).format(species.lower())


def all_captions(species: list[str]) -> list[str]:
    """Every caption the templates can produce: the corpus a caption vocabulary must cover."""
    return [template.format(name.lower()) for name in species for template in TEMPLATES]
