"""`python -m benchmarks.learning`: does the loop learn from the field, and does the gate know?

Starting from a champion trained on the demo's dataset (lab photos), the users send rounds of
corrected field photos (50, then 50, then 100 more: 200 in all); after each round a dataset
version is built (the hash-chosen field holdout included), a candidate is warm-started from the
champion, pruned, scored and gated, as the retrain DAG does. The served champion is measured on
fresh photos no version holds: lab photos like the training set's and field photos, each
top-1 with a 95% Wilson interval. Before the rounds, the drift test is run on field photos and on
fresh lab photos, and the noise is measured: the first model trained with three seeds, and once
on a training set with 5% of its images left out. Last, the 200-photo version is trained from
scratch instead, to show what the warm start is worth.

`--long-tail`: the same on IP102's 102 species with a long tail (60 down to 5 photos a class):
the first model and its retrain after 200 corrected field photos, once with images drawn in
proportion to their class and once class-balanced; top-1, macro-F1 and worst-class recall.

Writes benchmarks/LEARNING.md, benchmarks/learning.png and benchmarks/learning.json (with
`--long-tail`: LEARNING_LONG_TAIL.md and learning_long_tail.json). The stages
run in this process without Airflow, MLflow or the service (each is tested with them elsewhere);
the dataset versions are built by the same `build_version` the ingest DAG calls.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from scipy.stats import binomtest

from config import DriftConfig, Settings
from ml.data import read_classes
from ml.data.synthetic import Domain, class_sizes, generate_synthetic, user_photos
from ml.data.versions import Sample, build_version
from ml.drift import mmd_test, reference_logits
from ml.evaluate import collect_logits, score, slice_scores
from ml.model import load_classifier
from ml.prune import prune
from ml.runtime import PredictFn, eager_predict_fn
from ml.train import train
from registry.gate import decide

HERE = Path(__file__).parent
ROUNDS = [50, 50, 100]  # corrected field photos per round: 50, 100 and 200 in all
FRESH_PHOTOS = 300  # per domain, for the served model's top-1 and the drift test
SEEDS = [0, 1, 2]
DRIFT_WINDOW = DriftConfig().window  # photos per drift test: the drift DAG's window


@dataclass
class Accuracy:
    correct: int
    total: int
    macro_f1: float
    worst_class_recall: float

    @property
    def top1(self) -> float:
        return self.correct / self.total

    def interval(self) -> tuple[float, float]:
        ci = binomtest(self.correct, self.total).proportion_ci(0.95, method="wilson")
        return ci.low, ci.high

    def __str__(self) -> str:
        low, high = self.interval()
        return f"{self.top1:.3f} [{low:.3f}, {high:.3f}]"


@dataclass
class Model:
    name: str
    path: Path  # the pruned classifier, as served
    weights: Path  # the unpruned weights a retrain starts from
    lab: Accuracy
    field: Accuracy
    train_s: float


@dataclass
class Round:
    photos: int  # corrected field photos sent so far
    version: str
    held_out: int  # field holdout images the gate judged on
    candidate: Model
    promoted: bool
    p_value: float | None
    reasons: list[str]
    champion: Model  # served after the round


def fresh_photos(root: Path, classes: list[str], count: int, size: int, domain: Domain, seed: int) -> Path:
    """A test split of photos no dataset version holds."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, label) in enumerate(user_photos(len(classes), count, size, seed, domain)):
        image.save(root / "images" / f"{i}.jpg", quality=90)
        lines.append(f"{i}.jpg {label}\n")
    (root / "test.txt").write_text("".join(lines))
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def accuracy(predict: PredictFn, photos: Path, image_size: int) -> Accuracy:
    logits, labels = collect_logits(predict, photos, "test", image_size)
    metrics = slice_scores(logits, labels).metrics
    return Accuracy(int(np.sum(logits.argmax(1) == labels)), len(labels), metrics["macro_f1"], metrics["worst_class_recall"])


class Bench:
    def __init__(self, settings: Settings, work: Path, lab: Path, field: Path):
        self.settings, self.work, self.lab, self.field = settings, work, lab, field

    def train(self, name: str, dataset: Path, seed: int = 0, warm_start: Path | None = None) -> Model:
        """Train and prune as the retrain DAG does; the result measured on the fresh photos."""
        settings = self.settings.model_copy(update={"train": self.settings.train.model_copy(update={"seed": seed})})
        out = self.work / "models" / name
        shutil.rmtree(out, ignore_errors=True)  # a finished stage's checkpoints would be resumed, not retrained
        started = time.perf_counter()
        trained = train(settings, dataset_dir=dataset, out_dir=out / "train", warm_start=warm_start)
        pruned = prune(settings, model_path=trained.model_path, dataset_dir=dataset, out_dir=out / "prune")
        seconds = time.perf_counter() - started
        predict, size = self.predict(pruned.model_path)
        lab, field = accuracy(predict, self.lab, size), accuracy(predict, self.field, size)
        return Model(name, pruned.model_path, out / "train" / "weights.pt", lab, field, seconds)

    @staticmethod
    def predict(model_path: Path) -> tuple[PredictFn, int]:
        model = load_classifier(model_path)
        return eager_predict_fn(model), model.image_size


def corrected_photos(classes: list[str], count: int, size: int, seed: int) -> list[Sample]:
    """Field photos with their right species, as a labeler's feedback reaches a dataset version."""
    samples = []
    for i, (image, label) in enumerate(user_photos(len(classes), count, size, seed, "field")):
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=90)
        data = out.getvalue()
        samples.append(Sample(hashlib.sha256(data).hexdigest(), classes[label], data, f"benchmark:{seed}:{i}"))
    return samples


def rounds(bench: Bench, base: Path, champion: Model, sizes: list[int], field_share: float) -> list[Round]:
    classes, size = read_classes(base), bench.settings.synthetic.image_size
    results, parent, sent = [], base, 0
    for number, count in enumerate(sizes, start=1):
        sent += count
        version = bench.work / "versions" / f"v{number:04d}"
        build_version(parent, corrected_photos(classes, count, size, seed=1000 + number), version, field_share)
        candidate = bench.train(f"round{number}", version, warm_start=champion.weights)
        scores = [score(bench.predict(model.path)[0], version, classes, size) for model in (candidate, champion)]
        decision = decide(*scores, bench.settings.gate)
        p_value = decision.checks.get("improvement", {}).get("p_value")
        champion = candidate if decision.promoted else champion
        held_out = len(scores[0].get("field").labels) if "field" in scores[0] else 0
        results.append(Round(sent, version.name, held_out, candidate, decision.promoted, p_value, decision.reasons, champion))
        print(
            f"round {number}: {sent} photos, candidate lab {candidate.lab} field {candidate.field}, promoted {decision.promoted}"
        )
        parent = version
    return results


def drift(bench: Bench, champion: Model, base: Path) -> dict[str, float]:
    """p-values of the drift test against the lab reference: 200 field photos, 200 fresh lab photos."""
    predict, size = bench.predict(champion.path)
    reference = reference_logits(predict, base, size)
    return {
        domain: mmd_test(reference, collect_logits(predict, photos, "test", size)[0][:DRIFT_WINDOW]).p_value
        for domain, photos in (("field", bench.field), ("lab", bench.lab))
    }


def leave_out(base: Path, out: Path, share: float) -> Path:
    """The base dataset with `share` of its train images left out (a small change of the training set)."""
    shutil.copytree(base, out, dirs_exist_ok=True)
    lines = (base / "train.txt").read_text().splitlines(keepends=True)
    keep = np.random.default_rng(0).permutation(len(lines))[: int(len(lines) * (1 - share))]
    (out / "train.txt").write_text("".join(lines[i] for i in sorted(keep)))
    return out


def main(
    work_dir: Annotated[Path, typer.Option(help="where datasets and models go")] = Path("data/benchmarks/learning"),
    report_dir: Annotated[Path, typer.Option(help="where LEARNING.md, learning.png and learning.json go")] = HERE,
    field_share: Annotated[float, typer.Option(help="share of corrected photos held out as the field slice")] = 0.2,
    round_sizes: Annotated[list[int], typer.Option("--round", help="corrected photos sent per round")] = ROUNDS,
    fresh: Annotated[int, typer.Option(help="fresh photos per domain the served models are measured on")] = FRESH_PHOTOS,
    seeds: Annotated[list[int], typer.Option("--seed", help="seeds of the first model")] = SEEDS,
    long_tail: Annotated[bool, typer.Option(help="IP102's 102 species with a long tail, proportional vs balanced draws")] = False,
) -> None:
    settings = Settings(data_dir=work_dir)  # INSECT_* variables apply, as everywhere
    if long_tail:
        return long_tail_benchmark(settings, work_dir, report_dir, field_share, sum(round_sizes))
    base = generate_synthetic(work_dir / "base", settings.synthetic)
    classes, size = read_classes(base), settings.synthetic.image_size
    lab = fresh_photos(work_dir / "fresh-lab", classes, fresh, size, "lab", seed=7)
    bench = Bench(settings, work_dir, lab, fresh_photos(work_dir / "fresh-field", classes, fresh, size, "field", seed=8))
    started = time.perf_counter()
    by_seed = [bench.train(f"seed{seed}", base, seed=seed) for seed in seeds]
    smaller = bench.train("seed0-95pct", leave_out(base, work_dir / "base-95pct", 0.05))
    drift_p = drift(bench, by_seed[0], base)
    learned = rounds(bench, base, by_seed[0], round_sizes, field_share)
    cold = bench.train("last-round-from-scratch", work_dir / "versions" / learned[-1].version)
    minutes = (time.perf_counter() - started) / 60
    results = {"seeds": by_seed, "smaller_training_set": smaller, "drift_p": drift_p, "rounds": learned, "from_scratch": cold}
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "learning.json").write_text(json.dumps(_plain(results), indent=1, default=str))
    plot(report_dir / "learning.png", by_seed[0], learned)
    text = report(settings, dict(zip(seeds, by_seed, strict=True)), smaller, drift_p, learned, cold, minutes, fresh)
    (report_dir / "LEARNING.md").write_text(text)
    print(f"wrote {report_dir / 'LEARNING.md'} ({minutes:.1f} min)")


# 2,269 images, 60 down to 5 a class, every split as long-tailed as IP102's
LONG_TAIL = {"num_classes": 102, "images_per_class": 60, "tail_ratio": 12.0, "min_test_images_per_class": 0}
FRESH_PER_CLASS = 10


def long_tail_benchmark(settings: Settings, work_dir: Path, report_dir: Path, field_share: float, photos: int) -> None:
    """The first model and its retrain after `photos` corrected field photos, on IP102's species
    with a long tail, once drawing images in proportion to their class and once balanced."""
    settings = settings.model_copy(update={"synthetic": settings.synthetic.model_copy(update=LONG_TAIL)})
    work_dir = work_dir / "long-tail"
    base = generate_synthetic(work_dir / "base", settings.synthetic)
    classes, size = read_classes(base), settings.synthetic.image_size
    count = FRESH_PER_CLASS * len(classes)
    lab = fresh_photos(work_dir / "fresh-lab", classes, count, size, "lab", seed=7)
    field = fresh_photos(work_dir / "fresh-field", classes, count, size, "field", seed=8)
    started, arms = time.perf_counter(), {}
    for draws, balanced in (("proportional", False), ("balanced", True)):
        arm = settings.model_copy(update={"train": settings.train.model_copy(update={"balance_classes": balanced})})
        bench = Bench(arm, work_dir / draws, lab, field)
        first = bench.train("first", base)
        arms[draws] = {"first": first, "round": rounds(bench, base, first, [photos], field_share)[0]}
    minutes = (time.perf_counter() - started) / 60
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "learning_long_tail.json").write_text(json.dumps(_plain(arms), indent=1, default=str))
    (report_dir / "LEARNING_LONG_TAIL.md").write_text(long_tail_report(settings, arms, photos, count, minutes))
    print(f"wrote {report_dir / 'LEARNING_LONG_TAIL.md'} ({minutes:.1f} min)")


def long_tail_report(settings: Settings, arms: dict, photos: int, fresh: int, minutes: float) -> str:
    sizes = class_sizes(settings.synthetic)
    lines = [
        "# Learning from the field on a long tail",
        "",
        f"`python -m benchmarks.learning --long-tail` ({minutes:.0f} min on this machine's CPUs): IP102's "
        f"{len(sizes)} species, {sum(sizes)} lab photos falling off geometrically from {sizes[0]} to {sizes[-1]} a "
        f"class (`INSECT_SYNTHETIC__TAIL_RATIO={settings.synthetic.tail_ratio:g}`; IP102's own tail is steeper). Each "
        f"model measured on {fresh} fresh photos per domain, {FRESH_PER_CLASS} a species; top-1 with its 95% Wilson "
        f"interval. The retrain starts from the first model, after {photos} corrected field photos "
        f"(`INSECT_TRAIN__BALANCE_CLASSES` sets the draws).",
        "",
        "| draws | model | lab top-1 | lab macro-F1 | lab worst-class recall | field top-1 | field macro-F1 | "
        "field worst-class recall | gate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for draws, arm in arms.items():
        r = arm["round"]
        verdict = ("promoted" if r.promoted else "kept the first") + (f", p = {r.p_value:.2g}" if r.p_value is not None else "")
        for name, model, gate in (("first", arm["first"], ""), (f"after {photos} photos", r.candidate, verdict)):
            lab, field = model.lab, model.field
            lines.append(
                f"| {draws} | {name} | {lab} | {lab.macro_f1:.3f} | {lab.worst_class_recall:.2f} | {field} | "
                f"{field.macro_f1:.3f} | {field.worst_class_recall:.2f} | {gate} |"
            )
    return "\n".join([*lines, ""])


def _plain(value):
    """Dataclasses, lists and dicts of them as JSON-ready dicts."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return asdict(value) if hasattr(value, "__dataclass_fields__") else value


def points(value: float) -> str:
    return f"{100 * value:+.1f}"


def report(
    settings: Settings,
    by_seed: dict[int, Model],
    smaller: Model,
    drift_p: dict[str, float],
    learned: list[Round],
    cold: Model,
    minutes: float,
    fresh: int,
) -> str:
    gate, first, last = settings.gate, next(iter(by_seed.values())), learned[-1]
    lab_spread = max(m.lab.top1 for m in by_seed.values()) - min(m.lab.top1 for m in by_seed.values())
    field_spread = max(m.field.top1 for m in by_seed.values()) - min(m.field.top1 for m in by_seed.values())
    lines = [
        "# Learning from the field",
        "",
        f"`python -m benchmarks.learning` ({minutes:.0f} min on this machine's CPUs). Synthetic dataset of the demo "
        f"({settings.synthetic.num_classes} species, {settings.synthetic.images_per_class} lab photos each), model "
        f"`{settings.model.name}`. Every top-1 is measured on {fresh} fresh photos per domain no dataset holds, "
        "with its 95% Wilson interval; the gate judges on the version's own slices (lab test split, field holdout).",
        "",
        "## The noise",
        "",
        "| model | lab top-1 | field top-1 | train + prune |",
        "|---|---|---|---|",
        *(f"| seed {seed} | {m.lab} | {m.field} | {m.train_s:.0f} s |" for seed, m in by_seed.items()),
        f"| seed 0, 5% of train images left out | {smaller.lab} | {smaller.field} | {smaller.train_s:.0f} s |",
        "",
        f"Across seeds, lab top-1 spans **{100 * lab_spread:.1f} points** and field top-1 **{100 * field_spread:.1f} points**; "
        f"leaving 5% of the training images out moves lab top-1 by {points(smaller.lab.top1 - first.lab.top1)} points. "
        f"The gate's lab margin is {100 * gate.lab_margin:.0f} points on the lower end of a paired bootstrap interval, "
        f"and it promotes only on an improvement McNemar's test finds at p < {gate.alpha}.",
        "",
        "## Drift",
        "",
        f"The first champion's softmax outputs on {min(fresh, DRIFT_WINDOW)} photos against the lab reference "
        "(its val and test images), "
        f"MMD permutation test: field photos **p = {drift_p['field']:.4f}** (target < 0.01), fresh lab photos "
        f"**p = {drift_p['lab']:.4f}** (target > 0.05).",
        "",
        "## Rounds of corrected field photos",
        "",
        f"Start: the seed-0 model, lab {first.lab}, field {first.field}.",
        "",
        "| photos sent | version | field holdout | candidate lab | candidate field | gate | served lab | served field |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in learned:
        verdict = ("promoted" if r.promoted else "kept champion") + (f", p = {r.p_value:.2g}" if r.p_value is not None else "")
        lines.append(
            f"| {r.photos} | {r.version} | {r.held_out} | {r.candidate.lab} | {r.candidate.field} | {verdict} | "
            f"{r.champion.lab} | {r.champion.field} |"
        )
    lines += [
        "",
        *(f"- round {i}: {'; '.join(r.reasons)}" for i, r in enumerate(learned, start=1) if r.reasons),
        "",
        f"After {last.photos} photos the served champion's field top-1 is **{last.champion.field.top1:.3f}** (target ≥ 0.80), "
        f"its lab top-1 {points(last.champion.lab.top1 - first.lab.top1)} points from the first champion's (target ≥ -1.0); "
        f"the gate {'promoted' if last.promoted else 'did not promote'} the last candidate.",
        "",
        "## Warm start",
        "",
        f"The {last.photos}-photo version trained from scratch instead (pretraining included): "
        f"lab {cold.lab}, field {cold.field}, "
        f"{cold.train_s:.0f} s, against the warm start's lab {last.candidate.lab}, field {last.candidate.field}, "
        f"{last.candidate.train_s:.0f} s.",
        "",
        "![served champion per round](learning.png)",
        "",
    ]
    return "\n".join(lines)


def plot(path: Path, first: Model, learned: list[Round]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sent = [0, *(r.photos for r in learned)]
    served = [first, *(r.champion for r in learned)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for domain, colour in (("lab", "tab:blue"), ("field", "tab:orange")):
        accuracies = [getattr(m, domain) for m in served]
        top1 = np.array([a.top1 for a in accuracies])
        low, high = np.array([a.interval() for a in accuracies]).T
        ax.errorbar(sent, top1, yerr=[top1 - low, high - top1], marker="o", capsize=3, color=colour, label=f"{domain} photos")
    ax.set(xlabel="corrected field photos sent", ylabel="served champion's top-1 (95% interval)", ylim=(0, 1))
    ax.set_title("Does the loop learn from the field?")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    typer.run(main)
