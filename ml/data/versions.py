"""Dataset versions: each one a complete IP102-layout directory, with labelled samples added to
the train split. Val and test stay the parent's, so every version is scored on the same lab images
and models stay comparable across versions.

A version is immutable once built: `seal` lists every file's sha256 in `SHA256SUMS` (the format
`sha256sum --check` reads) and makes the files and directories read-only. Images of a sealed
parent are hard-linked (cheap, and a write through any link needs a chmod first); those of an
unsealed one (the base dataset, which its owner may still edit) are copied. `verify` refuses a
version whose files are no longer those it was sealed with: validation and training call it, and
so does a build on it, which would otherwise seal a changed parent's files as data.

A fixed share of the new images, chosen by their hash (so a retried build chooses the same),
goes to the `field` split instead of train: the users' own photos, never trained on, on which
every later model is scored and gated. It only grows, version to version."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from config import Settings
from ml.data.ip102 import FIELD_SPLIT, SPLITS, manifest, read_classes, read_split

VERSION_PREFIX = "v"
STAGING_SUFFIX = ".staging"
CHECKSUMS = "SHA256SUMS"


class TamperedVersionError(RuntimeError):
    """A sealed version's files changed since it was sealed; the message names each file."""


@dataclass(frozen=True)
class Sample:
    """A labelled image to add: the original bytes, identified by their sha256."""

    sha256: str
    label: str
    data: bytes
    source: str  # where it came from, kept in the version's samples.csv (e.g. "feedback:17")


@dataclass(frozen=True)
class VersionSummary:
    root: Path
    added: int  # new train images
    held_out: int  # new field images
    relabelled: int  # images already in train whose label changed
    skipped: list[str]  # sources not used, with why


def latest_version(versions_dir: Path) -> Path | None:
    versions = sorted(p for p in versions_dir.glob(f"{VERSION_PREFIX}[0-9]*") if p.is_dir() and p.suffix != STAGING_SUFFIX)
    return versions[-1] if versions else None


def current_dataset(settings: Settings) -> Path:
    """What training uses: the newest version built from feedback, else the base dataset."""
    return latest_version(settings.dataset_versions_dir) or settings.base_dataset_dir


def next_version(versions_dir: Path) -> Path:
    latest = latest_version(versions_dir)
    number = int(latest.name[len(VERSION_PREFIX) :]) + 1 if latest else 1
    return versions_dir / f"{VERSION_PREFIX}{number:04d}"


def _add_image(source: Path, target: Path, link: bool) -> None:
    """Hard-link a sealed parent's image (read-only already), copy any other: a version must not
    change when the base dataset's owner edits it, nor make their files read-only."""
    if link:
        try:
            os.link(source, target)
            return
        except OSError:  # another filesystem: copy instead
            pass
    shutil.copyfile(source, target)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _file_sums(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` but its checksums, by path relative to `root`."""
    files = (p for p in sorted(root.rglob("*")) if p.is_file() and p != root / CHECKSUMS)
    return {str(p.relative_to(root)): _sha256(p) for p in files}


def seal(root: Path) -> None:
    """Record every file's sha256 in `SHA256SUMS`, then make every file (0444) and directory
    (0555) read-only: a hard link shares its file's mode, so no version's image can be written
    through another version's link without a chmod first."""
    sums = _file_sums(root)
    (root / CHECKSUMS).write_text("".join(f"{sha}  {name}\n" for name, sha in sums.items()))
    for path in [*root.rglob("*"), root]:
        path.chmod(0o555 if path.is_dir() else 0o444)


def verify(root: Path) -> None:
    """Raise TamperedVersionError naming every file of a sealed version that changed, went
    missing or was added since `seal`. A dataset without checksums (the base dataset, a directory
    made by hand) has no seal to check."""
    if not (root / CHECKSUMS).is_file():
        return
    sealed = {name: sha for sha, name in (line.split("  ", 1) for line in (root / CHECKSUMS).read_text().splitlines())}
    now = _file_sums(root)
    changes = [
        f"{name} {'added' if name not in sealed else 'missing' if name not in now else 'changed'}"
        for name in sorted(sealed.keys() | now.keys())
        if sealed.get(name) != now.get(name)
    ]
    if changes:
        more = f" and {len(changes) - 20} more" if len(changes) > 20 else ""
        raise TamperedVersionError(f"dataset version {root} differs from its {CHECKSUMS}: {', '.join(changes[:20])}{more}")


def _remove(path: Path) -> None:
    """Remove a staged version a retried stage builds again: its directories made writable first,
    as `seal` left them (its files are left as they are: they may be links to a parent's)."""
    if not path.exists():
        return
    for directory in [path, *(p for p in path.rglob("*") if p.is_dir())]:
        directory.chmod(0o755)
    shutil.rmtree(path)


def _as_jpeg(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG", quality=95)
    return out.getvalue()


def in_field_holdout(sha256: str, share: float) -> bool:
    """Whether a new image is held out for the field slice: the first 32 bits of its sha256,
    read as a fraction, below `share`."""
    return int(sha256[:8], 16) / 2**32 < share


def build_version(parent: Path, samples: list[Sample], out: Path, field_share: float = 0.0) -> VersionSummary:
    """Write `parent` plus `samples` (the last label per image wins) to `out`, sealed.

    An image already in val, test or field is skipped (training on it would leak into the
    scores); an image already in train gets the new label; a new image goes to the field split
    when `in_field_holdout`, to train otherwise."""
    verify(parent)
    classes = read_classes(parent)
    table = manifest(parent)
    never_train = set(table.loc[table.split != "train", "sha256"])
    train_rows = table[table.split == "train"]
    train_file_by_sha = dict(zip(train_rows["sha256"], train_rows["file"], strict=True))

    _remove(out)
    (out / "images").mkdir(parents=True)
    link = (parent / CHECKSUMS).is_file()
    for image in (parent / "images").iterdir():
        _add_image(image, out / "images" / image.name, link)
    for name in ["classes.txt", *(f"{s}.txt" for s in SPLITS if s != "train")]:
        shutil.copyfile(parent / name, out / name)

    train = dict(read_split(parent, "train"))
    field = dict(read_split(parent, FIELD_SPLIT, optional=True))
    latest = {s.sha256: s for s in samples}  # dict keeps the last sample per image
    added = relabelled = held = 0
    skipped, rows = [], []
    for sample in latest.values():
        if sample.label not in classes:
            skipped.append(f"{sample.source}: unknown species {sample.label!r}")
            continue
        file = train_file_by_sha.get(sample.sha256) or f"feedback_{sample.sha256[:16]}.jpg"
        if sample.sha256 in never_train or file in field:  # feedback is stored re-encoded: known by name
            skipped.append(f"{sample.source}: image is in the val, test or field split")
            continue
        label = classes.index(sample.label)
        split = "train" if file in train or not in_field_holdout(sample.sha256, field_share) else FIELD_SPLIT
        if file in train:
            relabelled += train[file] != label
        else:
            (out / "images" / file).write_bytes(_as_jpeg(sample.data))
            added += split == "train"
            held += split == FIELD_SPLIT
        (train if split == "train" else field)[file] = label
        rows.append({"source": sample.source, "sha256": sample.sha256, "file": file, "label": sample.label, "split": split})
    for split, items in (("train", train), (FIELD_SPLIT, field)):
        if items or split == "train":
            (out / f"{split}.txt").write_text("".join(f"{file} {label}\n" for file, label in items.items()))
    _append_samples_csv(parent, out, rows)
    seal(out)
    return VersionSummary(out, added=added, held_out=held, relabelled=relabelled, skipped=skipped)


def feedback_files(root: Path, split: str) -> set[str]:
    """Images of a version's split that users sent or relabelled (none in a base dataset)."""
    samples = root / "samples.csv"
    if not samples.is_file():
        return set()
    with open(samples, newline="") as f:
        return {row["file"] for row in csv.DictReader(f) if row["split"] == split}


def _append_samples_csv(parent: Path, out: Path, rows: list[dict]) -> None:
    """`samples.csv`: every sample added since the base dataset, with where it came from."""
    fields = ["source", "sha256", "file", "label", "split"]
    previous = parent / "samples.csv"
    with open(out / "samples.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        if previous.exists():
            with open(previous, newline="") as earlier:
                writer.writerows(csv.DictReader(earlier))
        writer.writerows(rows)
