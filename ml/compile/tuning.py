"""MetaSchedule tuning that makes progress on a small CPU machine, and pre-tuned records.

MetaSchedule's LocalBuilder starts fresh worker processes for every round of candidates, and each
worker first imports TVM's tensor intrinsics (about a minute on 2 cores): most of the tuning
budget goes to imports. The builder here keeps its workers, imported once, for the whole run.

Records are looked up per kernel (operator and shapes, not weights): a retrained model reuses
them, and only kernels that no database knows are tuned. Besides the project's own database,
`records/` ships the best schedules for the default model's kernels (like TVM's TopHub), so a
fresh checkout builds fast libraries without an hour of tuning; `python -m ml.compile.tuning`
regenerates them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder, local_builder
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind
from tvm_ffi import structural_hash

SHIPPED_RECORDS = Path(__file__).with_name("records")
SHIPPED_BATCH_SIZES = (1, 8)  # the benchmark's, which include the pipeline's


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
        return [
            BuilderResult(r.value, None)
            if r.status == StatusKind.COMPLETE
            else BuilderResult(None, f"build {r.status.name.lower()}: {r.value}")
            for r in self._pool.map_with_error_catching(lambda job: local_builder._worker_func(*job), jobs)
        ]


def _databases(tuning_dir: Path, shipped: bool) -> list[ms.database.JSONDatabase]:
    tuning_dir.mkdir(parents=True, exist_ok=True)
    local = ms.database.JSONDatabase(work_dir=str(tuning_dir))
    return [local, ms.database.JSONDatabase(work_dir=str(SHIPPED_RECORDS), allow_missing=False)] if shipped else [local]


def known_records(tuning_dir: Path, shipped: bool = True) -> ms.database.Database:
    """The project's database at `tuning_dir`, then (unless `shipped` is off) the shipped
    records: a kernel tuned here takes its own record, any other the shipped one."""
    return ms.database.OrderedUnionDatabase(*_databases(tuning_dir, shipped))


def new_tasks(tasks: list, databases: list[ms.database.Database]) -> list:
    """The extracted `tasks` (kernels) that none of `databases` has seen."""
    return [task for task in tasks if not any(database.has_workload(task.dispatched[0]) for database in databases)]


def tune(mod, target, trials: int, tuning_dir: Path, workers: int, shipped: bool = True) -> ms.database.Database:
    """Tune the kernels of the fused module `mod` that no tuning run here has seen and no
    shipped record covers, within `trials` MetaSchedule trials; records go to the JSON database
    at `tuning_dir`. Each kernel is tuned once: a later compile with the same shapes tunes
    nothing (delete `tuning_dir` to start over). Returns every known record, for the build."""
    databases = _databases(tuning_dir, shipped)
    if trials > 0:
        tasks = new_tasks(ms.relax_integration.extract_tasks(mod, target), databases)
        tune_tasks(tasks, trials, databases[0], tuning_dir, workers)
    return known_records(tuning_dir, shipped)  # reopened: the JSON files hold what tuning just added


def tune_tasks(
    tasks: list,
    trials: int,
    database: ms.database.Database,
    tuning_dir: Path,
    workers: int,
    trials_per_task: int | None = None,
    seed: int = 0,
) -> None:
    """Tune `tasks` within `trials` trials in all (and `trials_per_task` each), recording every
    measured schedule in `database`. Every task is marked seen, even where the budget ran out
    before its turn."""
    if not tasks or trials <= 0:
        return
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(tasks, str(tuning_dir), seed=seed)
    ms.tune.tune_tasks(
        tasks=contexts,
        task_weights=weights,
        work_dir=str(tuning_dir),
        max_trials_global=trials,
        max_trials_per_task=trials_per_task,
        num_trials_per_iter=16,
        builder=WarmLocalBuilder(workers),
        runner=ms.runner.LocalRunner(timeout_sec=60),
        database=database,
        cost_model="xgb",
    )
    for task in tasks:
        database.commit_workload(task.dispatched[0])


def keep_best(sources: list[ms.database.Database], kernels: set[int], out_dir: Path) -> int:
    """Write the best record in `sources` of each kernel in `kernels` (structural hashes) into a
    fresh JSON database at `out_dir`: records of kernels no model has any more are left behind."""
    best = {}
    for record in (record for source in sources for record in source.get_all_tuning_records()):
        key = structural_hash(record.workload.mod)
        if record.run_secs and key in kernels:
            seconds = sum(float(s) for s in record.run_secs) / len(record.run_secs)
            if key not in best or seconds < best[key][0]:
                best[key] = (seconds, record)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("database_workload.json", "database_tuning_record.json"):
        (out_dir / name).unlink(missing_ok=True)
    out = ms.database.JSONDatabase(work_dir=str(out_dir))
    for _, record in best.values():
        out.commit_tuning_record(
            ms.database.TuningRecord(
                record.trace, out.commit_workload(record.workload.mod), record.run_secs, record.target, record.args_info
            )
        )
    return len(best)


def main(
    trials: Annotated[int, typer.Option(help="trials in all for the kernels the work database has not seen")] = 900,
    with_unpruned: Annotated[
        bool, typer.Option("--with-unpruned/--pruned-only", help="also the unpruned model, which the benchmark compares")
    ] = True,
    retune: Annotated[list[str] | None, typer.Option(help="a kernel (task name) to tune again, though seen; repeatable")] = None,
    retune_trials: Annotated[int, typer.Option(help="trials for each kernel named by --retune")] = 64,
    batches: Annotated[list[int], typer.Option("--batch", help="batch sizes")] = list(SHIPPED_BATCH_SIZES),  # noqa: B006
) -> None:
    """Regenerate `records/`: tune the kernels of the default model, pruned (what the pipeline
    ships) and unpruned (what the benchmark compares), at each batch size on this CPU, then
    keep the best record of each kernel they have. The models are untrained: schedules depend on
    shapes, not weights. Kernels that `records/` covers are only tuned again by --retune, and
    its records compete with the work database's (data/tuning-shipped, kept so an interrupted run
    resumes): a regeneration never loses a faster schedule, even after `make clean`."""
    import copy

    import torch

    from config import get_settings
    from ml.compile import export, fused_kernels, host_tvm_target, to_relax
    from ml.model import SpeciesClassifier, build_coca
    from ml.prune import prune_structure

    settings = get_settings()
    torch.manual_seed(0)
    classes = [f"class {i}" for i in range(settings.synthetic.num_classes)]
    unpruned = SpeciesClassifier.from_coca(build_coca(settings.model.name), classes).eval()
    pruned = copy.deepcopy(unpruned)
    prune_structure(pruned, settings.prune.model_copy(update={"importance": "magnitude"}))
    target = host_tvm_target()
    task_lists = [
        ms.relax_integration.extract_tasks(fused_kernels(to_relax(export(model, batch)), target), target)
        for model in ([pruned, unpruned] if with_unpruned else [pruned])
        for batch in batches
    ]
    names = {task.task_name for tasks in task_lists for task in tasks}
    retune = set(retune or ())
    if unknown := retune - names:
        raise typer.BadParameter(f"no kernel named {sorted(unknown)}; the models have: {', '.join(sorted(names))}")
    work_dir = settings.data_dir / "tuning-shipped"
    work, shipped = _databases(work_dir, shipped=True)
    for tasks in task_lists:
        tune_tasks(new_tasks(tasks, [work, shipped]), trials, work, work_dir, os.cpu_count())
        again = [task for task in tasks if task.task_name in retune]
        # another seed than the first tuning's, so the search does not retrace its steps
        tune_tasks(again, retune_trials * len(again), work, work_dir, os.cpu_count(), retune_trials, seed=1)
    in_use = {structural_hash(task.dispatched[0]) for tasks in task_lists for task in tasks}
    kept = keep_best([work, shipped], in_use, SHIPPED_RECORDS)
    print(f"best records of {kept} kernels in {SHIPPED_RECORDS}")


if __name__ == "__main__":
    typer.run(main)
