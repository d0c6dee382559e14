"""Feedback -> a new dataset version, in two steps so a version that fails validation is never
published: `stage` writes it next to the published ones, `publish` renames it into place and
marks the feedback it consumed, in one database transaction."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from config import Settings
from feedback import db
from feedback.images import image_store
from ml.data.versions import STAGING_SUFFIX, Sample, VersionSummary, build_version, current_dataset, next_version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagedVersion:
    staging_dir: Path
    target_dir: Path
    parent_dir: Path
    feedback_ids: list[int]
    summary: VersionSummary

    def handoff(self) -> dict:
        """What the next tasks need (XCom): where it is staged and published, what it consumed."""
        added = self.summary.added + self.summary.relabelled
        return {
            "staging_dir": str(self.staging_dir),
            "target_dir": str(self.target_dir),
            "feedback_ids": self.feedback_ids,
            "num_samples": added,
        }


def stage(settings: Settings) -> StagedVersion:
    """Build the next dataset version from the current one plus all unconsumed feedback."""
    rows = db.pending_feedback(db.engine(settings))
    store = image_store(settings)
    samples = [Sample(row.image_sha256, row.corrected_label, store.get(row.image_key), f"feedback:{row.id}") for row in rows]
    parent = current_dataset(settings)
    target = next_version(settings.dataset_versions_dir)
    staging = target.with_name(target.name + STAGING_SUFFIX)
    summary = build_version(parent, samples, staging)
    log.info(
        "staged %s from %s: %d images added, %d relabelled, %d skipped %s",
        target.name,
        parent,
        summary.added,
        summary.relabelled,
        len(summary.skipped),
        summary.skipped,
    )
    return StagedVersion(staging, target, parent, [row.id for row in rows], summary)


def publish(settings: Settings, staging_dir: Path, target_dir: Path, feedback_ids: list[int], num_samples: int) -> int:
    """Make the staged version current and mark its feedback consumed; returns the export id."""
    if target_dir.exists():
        raise FileExistsError(f"{target_dir} was published by another run; stage again")
    staging_dir.rename(target_dir)
    return db.mark_exported(db.engine(settings), feedback_ids, target_dir, num_samples)
