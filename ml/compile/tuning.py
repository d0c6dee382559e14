"""MetaSchedule tuning that makes progress on a small CPU machine.

MetaSchedule's LocalBuilder starts fresh worker processes for every round of candidates, and each
worker first imports TVM's tensor intrinsics (about a minute on 2 cores): most of the tuning
budget goes to imports. The builder here keeps its workers, imported once, for the whole run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tvm import tirx
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder, local_builder
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

# The operators that carry the FLOPs get the trials; the rest keep TVM's default schedules.
TUNED_OPS = ["matmul", "conv2d"]
from tvm_ffi import structural_hash


def _import_tensor_intrinsics() -> None:
    import tvm.s_tir.tensor_intrin  # noqa: F401


@derived_object
class WarmLocalBuilder(PyBuilder):
    """LocalBuilder's build, on worker processes that live across rounds."""

    def __init__(self, max_workers: int, timeout_sec: float = 120.0):
        super().__init__()
        self._pool = PopenPoolExecutor(max_workers=max_workers, timeout=timeout_sec, initializer=_import_tensor_intrinsics)

    def build(self, build_inputs: list) -> list[BuilderResult]:
        jobs = [(None, None, i.mod, i.target, local_builder._serialize_params(i.params)) for i in build_inputs]
        return [BuilderResult(r.value, None) if r.status == StatusKind.COMPLETE else
                BuilderResult(None, f"build {r.status.name.lower()}: {r.value}")
                for r in self._pool.map_with_error_catching(lambda job: local_builder._worker_func(*job), jobs)]


def kernels_key(mod) -> str:
    """Identifies the module's kernels (operators and shapes), not its weights: a retrained
    model of the same architecture has the same key and reuses the records."""
    kernels = sorted(str(structural_hash(func)) for _, func in mod.functions.items() if isinstance(func, tirx.PrimFunc))
    return hashlib.sha256(",".join(kernels).encode()).hexdigest()[:16]


def tune(mod, target, trials: int, tuning_dir: Path, workers: int) -> ms.database.JSONDatabase:
    """MetaSchedule records for `mod` in the JSON database at `tuning_dir`. A module tuned there
    before (same operators and shapes, same target) is not tuned again: its records are reused."""
    tuning_dir.mkdir(parents=True, exist_ok=True)
    ledger = tuning_dir / "tuned_modules.json"
    tuned = json.loads(ledger.read_text()) if ledger.exists() else {}
    key = f"{kernels_key(mod)}:{target}"
    if trials > 0 and key not in tuned:
        ms.relax_integration.tune_relax(
            mod, {}, target, work_dir=str(tuning_dir), max_trials_global=trials, op_names=TUNED_OPS, num_trials_per_iter=16,
            builder=WarmLocalBuilder(workers), runner=ms.runner.LocalRunner(timeout_sec=60),
            cost_model="xgb", seed=0)
        tuned[key] = {"trials": trials}
        ledger.write_text(json.dumps(tuned, indent=1))
    return ms.database.JSONDatabase(work_dir=str(tuning_dir))
