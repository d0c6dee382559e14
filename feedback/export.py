"""Feedback -> a new dataset version, in two steps so a version that fails validation is never
published: `stage` screens each pending row (a bad one is quarantined with its reason, the rest go
on) and writes the version, sealed read-only (`ml.data.versions.seal`), next to the published
ones; `publish` records the version and marks the feedback it consumed in one database
transaction, then moves it into place. A publish killed after its commit is finished by its retry
(Airflow's, with the same staged version), which records nothing twice and returns the same export
id; a run killed for good leaves a recorded version still staged, which the next run moves in
(`finish_interrupted_publish`). So no version is published twice and no row consumed twice."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from config import Settings
from feedback import db
from feedback.images import image_store
from feedback.screening import held_out_hashes, rejection
from ml.data import read_classes
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
    """Build the next dataset version from the current one plus the pending feedback that passes
    screening; quarantine the rest."""
    finish_interrupted_publish(settings)
    engine, store, parent = db.engine(settings), image_store(settings), current_dataset(settings)
    classes, held_out = read_classes(parent), held_out_hashes(parent)
    samples, accepted, refused = [], [], {}
    for row in db.pending_feedback(engine, settings.feedback.client_agreement):
        data = store.get(row.image_key)
        if reason := rejection(data, row.corrected_label, classes, held_out):
            refused[row.id] = reason
        else:
            samples.append(Sample(row.image_sha256, row.corrected_label, data, f"feedback:{row.id}"))
            accepted.append(row.id)
    db.quarantine(engine, refused)
    for feedback_id, reason in refused.items():
        log.warning("feedback %d quarantined: %s", feedback_id, reason)
    target = next_version(settings.dataset_versions_dir)
    staging = target.with_name(target.name + STAGING_SUFFIX)
    summary = build_version(parent, samples, staging, settings.feedback.field_holdout_share)
    log.info(
        "staged %s from %s: %d images added to train, %d held out as field, %d relabelled, %d skipped %s",
        target.name,
        parent,
        summary.added,
        summary.held_out,
        summary.relabelled,
        len(summary.skipped),
        summary.skipped,
    )
    return StagedVersion(staging, target, parent, accepted, summary)


def publish(settings: Settings, staging_dir: Path, target_dir: Path, feedback_ids: list[int], num_samples: int) -> int:
    """Record the staged version and mark its feedback consumed (one transaction), then move it
    into place; returns the export id. Retried after a crash past the commit (or past the move),
    it finds its own record, moves the version in if it is not yet, and returns the same id: the
    publish task then emits the same Asset event as an uninterrupted one."""
    engine = db.engine(settings)
    if target_dir.exists() and db.export_of(engine, target_dir) is None:
        raise FileExistsError(f"{target_dir} exists but no export records it; stage again")
    export_id = db.mark_exported(engine, feedback_ids, target_dir, num_samples)
    if not target_dir.exists():
        staging_dir.rename(target_dir)
    return export_id


def finish_interrupted_publish(settings: Settings) -> list[Path]:
    """Move recorded versions that are still staged (their run was killed) into place."""
    finished = []
    for export in db.exports(db.engine(settings)):
        target = Path(export.dataset_dir)
        staging = target.with_name(target.name + STAGING_SUFFIX)
        if not target.exists() and staging.is_dir():
            staging.rename(target)
            log.warning("finished publishing %s (its run stopped after recording it)", target)
            finished.append(target)
    return finished
