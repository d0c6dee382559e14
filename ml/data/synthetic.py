"""A small procedurally drawn insect dataset in the IP102 layout, for the demo and tests.

Each species gets a fixed body plan (colours, segment count, wing shape, markings, legs,
antennae); every image varies it (pose, scale, colour jitter, leaf background, blur, noise), so
a small model has something real to learn and accuracy means something.

Two domains: `lab` photos (the dataset: the insect large, on a leaf, well lit) and `field`
photos (what users send: smaller in the frame, on soil or sand, dimmer light with a colour cast,
camera blur). The dataset is never drawn from the field domain; users and tests are.
"""

from __future__ import annotations

import colorsys
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from config import SyntheticDataConfig
from ml.data.ip102 import IP102_CLASSES_FILE, SPLITS

SUPERSAMPLE = 3  # draw large, then downsample: smooth edges without an antialiasing library
MAX_CANVAS = 3 * 128  # beyond it, draw at the image's own size: 3 × 512 px took 0.4 s an image, 1 × 0.04 s
WING_SHAPES = ("none", "round", "long", "butterfly")
MARKINGS = ("plain", "stripes", "spots")


@dataclass(frozen=True)
class BodyPlan:
    """How one species looks in the synthetic dataset."""

    body_rgb: tuple[float, float, float]
    mark_rgb: tuple[float, float, float]
    segments: int
    elongation: float
    wings: str
    marking: str
    legs: bool
    antenna: float


def species_plan(index: int, num_classes: int) -> BodyPlan:
    """A body plan per class: hues spread evenly, shape attributes cycling out of phase."""
    rng = np.random.default_rng(1000 + index)
    hue = index / num_classes
    body = colorsys.hsv_to_rgb(hue, 0.55 + 0.4 * rng.random(), 0.45 + 0.5 * rng.random())
    mark = colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.8, 0.2 + 0.7 * rng.random())
    return BodyPlan(
        body_rgb=body,
        mark_rgb=mark,
        segments=1 + index % 3,
        elongation=1.0 + 1.2 * ((index * 7) % 5) / 4,
        wings=WING_SHAPES[(index // 3) % len(WING_SHAPES)],
        marking=MARKINGS[(index // 2) % len(MARKINGS)],
        legs=index % 2 == 0,
        antenna=0.2 + 0.6 * rng.random(),
    )


def _jitter(rgb: tuple[float, float, float], rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(255 * min(1.0, max(0.0, c + rng.normal(0, 0.06)))) for c in rgb)  # type: ignore[return-value]


def _leaf_background(size: int, rng: np.random.Generator) -> Image.Image:
    """Green-to-brown gradient with soft blotches: a leaf, never a plain colour."""
    base = np.array(colorsys.hsv_to_rgb(rng.uniform(0.08, 0.35), rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.8)))
    return _blotched(base, size, rng)


def _ground_background(size: int, rng: np.random.Generator) -> Image.Image:
    """Soil or sand: dull ochre to grey-brown, blotched, with a grain of pebbles."""
    base = np.array(colorsys.hsv_to_rgb(rng.uniform(0.05, 0.13), rng.uniform(0.1, 0.45), rng.uniform(0.35, 0.85)))
    image = _blotched(base, size, rng)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(40, 90)):
        x, y, r = [*rng.uniform(0, size, 2).tolist(), rng.uniform(size * 0.004, size * 0.015)]
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_jitter(tuple(base * rng.uniform(0.5, 1.4)), rng))
    return image


def _blotched(base: np.ndarray, size: int, rng: np.random.Generator) -> Image.Image:
    ramp = np.linspace(-0.15, 0.15, size)[None, :, None] * rng.choice([-1, 1])
    pixels = np.clip(base[None, None, :] + ramp, 0, 1) * np.ones((size, size, 3))
    image = Image.fromarray((pixels * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 9)):
        x, y, r = [*rng.uniform(0, size, 2).tolist(), rng.uniform(size * 0.05, size * 0.25)]
        shade = _jitter(tuple(np.clip(base * rng.uniform(0.7, 1.3), 0, 1)), rng)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=shade)
    return image.filter(ImageFilter.GaussianBlur(size / 40))


def _draw_insect(species: BodyPlan, size: int, rng: np.random.Generator) -> Image.Image:
    """The insect on a transparent canvas, facing up, centred."""
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    cx, unit = size / 2, size / 9
    body, mark = _jitter(species.body_rgb, rng), _jitter(species.mark_rgb, rng)
    seg_h = unit * species.elongation
    top = size / 2 - seg_h * species.segments / 2
    if species.wings != "none":
        _draw_wings(draw, species.wings, cx, size / 2, unit, mark)
    for i in range(species.segments):
        w = unit * (1.3 - 0.2 * i)
        y0 = top + i * seg_h
        box = (cx - w, y0, cx + w, y0 + seg_h * 1.1)
        draw.ellipse(box, fill=(*body, 255))
        _draw_marking(draw, species.marking, box, mark, rng)
    head_r = unit * 0.55
    draw.ellipse((cx - head_r, top - 2 * head_r, cx + head_r, top), fill=(*mark, 255))
    width = max(1, size // 60)
    antenna = unit * 4 * species.antenna
    for side in (-1, 1):
        draw.line((cx, top - head_r, cx + side * antenna * 0.6, top - head_r - antenna), fill=(*mark, 255), width=width)
        if species.legs:
            for k in range(3):
                y = top + seg_h * species.segments * (0.25 + 0.25 * k)
                draw.line((cx, y, cx + side * unit * 2.4, y + unit * (k - 1)), fill=(*body, 255), width=width)
    return canvas


def _draw_wings(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, unit: float, rgb: tuple) -> None:
    fill = (*rgb, 150)  # translucent
    for side in (-1, 1):
        if shape == "round":
            draw.ellipse(
                (cx + side * unit * 0.3 - unit * 1.6, cy - unit * 2.2, cx + side * unit * 0.3 + unit * 1.6, cy + unit * 0.6),
                fill=fill,
            )
        elif shape == "long":
            draw.polygon(
                [(cx, cy - unit), (cx + side * unit * 1.2, cy + unit * 3.5), (cx + side * unit * 0.2, cy + unit * 3.2)], fill=fill
            )
        else:  # butterfly: two big lobes a side
            draw.ellipse(
                (cx + side * unit * 3.4 - unit * 1.8, cy - unit * 3.0, cx + side * unit * 3.4 + unit * 1.8, cy + unit * 0.2),
                fill=fill,
            )
            draw.ellipse(
                (cx + side * unit * 2.4 - unit * 1.3, cy - unit * 0.2, cx + side * unit * 2.4 + unit * 1.3, cy + unit * 2.4),
                fill=fill,
            )


def _draw_marking(draw: ImageDraw.ImageDraw, marking: str, box: tuple, rgb: tuple, rng: np.random.Generator) -> None:
    x0, y0, x1, y1 = box
    if marking == "stripes":
        for k in (1, 2):
            y = y0 + (y1 - y0) * k / 3
            draw.line((x0 + (x1 - x0) * 0.15, y, x1 - (x1 - x0) * 0.15, y), fill=(*rgb, 255), width=max(1, int((y1 - y0) / 8)))
    elif marking == "spots":
        r = min(x1 - x0, y1 - y0) / 9
        for _ in range(3):
            x, y = rng.uniform(x0 + 3 * r, x1 - 3 * r), rng.uniform(y0 + 3 * r, y1 - 3 * r)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(*rgb, 255))


Domain = Literal["lab", "field"]


def canvas_size(size: int) -> int:
    """The side an image of `size` px is drawn at before it is downsampled."""
    return size * max(1, min(SUPERSAMPLE, MAX_CANVAS // size))


def render(species: BodyPlan, size: int, rng: np.random.Generator, domain: Domain = "lab") -> Image.Image:
    """One photograph-like sample: the insect posed on a background, blurred and noisy; in the
    field domain smaller, on the ground, in dim, tinted light, with more blur."""
    field = domain == "field"
    big = canvas_size(size)
    image = (_ground_background if field else _leaf_background)(big, rng)
    insect = _draw_insect(species, big, rng)
    insect = insect.rotate(rng.uniform(0, 360), resample=Image.Resampling.BICUBIC)
    scale = rng.uniform(0.55, 0.8) if field else rng.uniform(0.7, 1.05)
    insect = insect.resize((int(big * scale),) * 2, Image.Resampling.BICUBIC)
    offset = rng.uniform(-0.2 if field else -0.1, 0.2 if field else 0.1, 2) * big + (big - insect.size[0]) / 2
    image.paste(insect, tuple(int(o) for o in offset), insect)
    blur = rng.uniform(0.6, 1.4) if field else rng.uniform(0, 1.2)
    image = image.filter(ImageFilter.GaussianBlur(blur * big / size))
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32)
    if field:  # dimmer light with a colour cast: one gain per channel
        pixels = pixels * rng.uniform(0.55, 0.8) * rng.uniform(0.85, 1.15, 3)
    noisy = pixels + rng.normal(0, rng.uniform(2, 10), (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def user_photos(
    num_classes: int, count: int, size: int, seed: int, domain: Domain = "field"
) -> Iterator[tuple[Image.Image, int]]:
    """`count` photos of the first `num_classes` species, classes taking turns (as users would
    send them), with their labels: what the demo's users, the benchmarks and the tests send."""
    rng = np.random.default_rng(seed)
    plans = [species_plan(label, num_classes) for label in range(num_classes)]
    for i in range(count):
        yield render(plans[i % num_classes], size, rng, domain), i % num_classes


MARKER = ".synthetic.json"  # the generator's signature in a directory it wrote: its settings


def generate_synthetic(out_dir: Path, cfg: SyntheticDataConfig) -> Path:
    """Write `images/`, `train.txt`/`val.txt`/`test.txt` and `classes.txt` under `out_dir`.

    `out_dir` must be missing, empty, or written by this generator: anything else (a real IP102
    checkout) is refused untouched. With the same settings as last time nothing is rewritten;
    with others the dataset is drawn beside it and swapped in, so a dataset version that
    hard-links the old images keeps them.

    Returns:
        `out_dir`, for chaining.
    """
    signature = cfg.model_dump_json()
    if (out_dir / MARKER).is_file() and (out_dir / MARKER).read_text() == signature:
        return out_dir
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
        raise FileExistsError(f"{out_dir} holds files the generator did not write (a real dataset?); it is left alone")
    drawing = out_dir.with_name(out_dir.name + ".drawing")
    shutil.rmtree(drawing, ignore_errors=True)
    _draw(drawing, cfg)
    (drawing / MARKER).write_text(signature)
    if out_dir.exists():
        retired = out_dir.with_name(out_dir.name + ".retired")
        out_dir.rename(retired)
        drawing.rename(out_dir)
        shutil.rmtree(retired)
    else:
        drawing.rename(out_dir)
    return out_dir


def class_sizes(cfg: SyntheticDataConfig) -> list[int]:
    """Images per species: `images_per_class` each, or falling off by `tail_ratio` over the classes."""
    decay = cfg.tail_ratio ** (-np.arange(cfg.num_classes) / max(1, cfg.num_classes - 1))
    return [max(5, round(cfg.images_per_class * d)) for d in decay]


def split_sizes(cfg: SyntheticDataConfig) -> list[tuple[int, int, int]]:
    """(train, val, test) images per species: 60/20/20 of its size, test at least `min_test_images_per_class`."""
    return [
        (int(n * 0.6), int(n * 0.2), max(n - int(n * 0.6) - int(n * 0.2), cfg.min_test_images_per_class))
        for n in class_sizes(cfg)
    ]


def _draw(out_dir: Path, cfg: SyntheticDataConfig) -> None:
    names = IP102_CLASSES_FILE.read_text().splitlines()
    if not 1 <= cfg.num_classes <= len(names):
        raise ValueError(f"num_classes must be within 1..{len(names)}, got {cfg.num_classes}")
    if cfg.images_per_class < 5:
        raise ValueError("images_per_class must be at least 5 so every split gets each class")
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    lines: dict[str, list[str]] = {split: [] for split in SPLITS}
    sizes = split_sizes(cfg)
    progress = tqdm(total=sum(map(sum, sizes)), desc="drawing insects", unit="img")
    for label, (n_train, n_val, n_test) in enumerate(sizes):
        species = species_plan(label, cfg.num_classes)
        for i in range(n_train + n_val + n_test):
            name = f"{label:03d}_{i:04d}.jpg"
            render(species, cfg.image_size, rng).save(images / name, quality=92)
            split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
            lines[split].append(f"{name} {label}")
            progress.update()
    progress.close()
    for split, rows in lines.items():
        (out_dir / f"{split}.txt").write_text("\n".join(rows) + "\n")
    # IP102's own classes.txt numbers its species from 1; the loader reads both forms.
    (out_dir / "classes.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(names[: cfg.num_classes])))
