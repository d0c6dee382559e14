"""What each pipeline stage hands the next: plain, JSON-serialisable records (no torch here, so the
registry and the DAGs read them without loading the training stack).

Every stage writes its record as `result.json` in its output directory and returns it; a DAG task
passes it on through XCom as `model_dump(mode="json")`, a shell user through `--*-dir` options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict

RESULT_FILE = "result.json"
# The train stage's weights in its MLflow run, with their species: what a retrain warm-starts from.
WARM_START_ARTIFACT = "train/weights.pt"


class StageResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def save(self, out_dir: Path) -> Self:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / RESULT_FILE).write_text(self.model_dump_json(indent=2))
        return self

    @classmethod
    def load(cls, out_dir: Path) -> Self:
        path = out_dir / RESULT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: run the stage that writes it first")
        return cls.model_validate_json(path.read_text())


class ValidationSummary(StageResult):
    dataset_dir: Path
    digest: str  # of the manifest and classes: what a model version was trained on
    num_images: int
    num_classes: int
    report_path: Path


class TrainResult(StageResult):
    model_path: Path  # the whole classifier, torch.save'd
    val_top1: float
    epochs_run: int


class PruneResult(StageResult):
    model_path: Path
    flops_before: int
    flops_after: int
    val_top1_before: float
    val_top1_after: float


class CompileResult(StageResult):
    artifacts: dict[str, Path]  # registry artifact key -> file (ml.runtime names the keys)
    llvm_target: dict  # the CPU the llvm libraries were built for
    max_abs_diff: float
    top1_agreement: float


class SliceScores(BaseModel):
    """One model on one evaluation slice, with its answer per image (what paired tests compare)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    metrics: dict[str, float]  # top1, top5, macro_f1, worst_class_recall, ece
    class_recall: list[float | None]  # per class; None where the slice holds no image of it
    predicted: list[int]  # per image, in the slice's order
    labels: list[int]


class Evaluation(StageResult):
    candidate: dict[str, SliceScores]  # slice name (lab, field) -> the evaluated model's scores
    baseline: dict[str, SliceScores] | None  # the served champion's, on the same images, when there is one
    classes: list[str]
    image_size: int

    def metrics(self, model: Literal["candidate", "baseline"] = "candidate") -> dict[str, float]:
        """Flat `<slice>_<metric>` numbers, as logged to MLflow."""
        scores = getattr(self, model) or {}
        return {f"{name}_{key}": value for name, slice_ in scores.items() for key, value in slice_.metrics.items()}
