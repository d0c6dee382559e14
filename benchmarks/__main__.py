"""`python -m benchmarks`: every way to run the classifier, side by side in one process.

For the unpruned and the pruned model of the newest retraining run (or --run-dir), at each
batch size: eager PyTorch, torch.compile, ONNX Runtime and the tuned TVM library; median and p99
latency, throughput, peak memory and GFLOP/s against this CPU's measured matmul peak; test-split
accuracy of both models. Writes benchmarks/REPORT.md and benchmarks/latency.png.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from benchmarks.measure import Timing, matmul_peak_gflops, peak_rss_during, time_calls, time_interleaved
from benchmarks.report import write_report
from benchmarks.runtimes import RUNTIMES
from config import Settings, get_settings
from ml.compile.tuning import SHIPPED_BATCH_SIZES
from ml.data.versions import current_dataset
from ml.evaluate import score
from ml.model import load_classifier
from ml.prune import count_flops, prune
from ml.runtime import eager_predict_fn

HERE = Path(__file__).parent


def newest_run_dir(work_dir: Path) -> Path:
    runs = [p.parent.parent for p in work_dir.glob("*/prune/pruned.pt")]
    if not runs:
        raise typer.BadParameter(f"no retraining run under {work_dir}: run `make demo` first, or pass --run-dir")
    return max(runs, key=lambda p: (p / "prune" / "pruned.pt").stat().st_mtime)


def pruned_top1_by_seed(run_dir: Path, dataset: Path, settings: Settings, seeds: list[int]) -> dict[int, float]:
    """Test top-1 of the run's unpruned model pruned again, one recovery fine-tune per seed: how
    much of the pruning result is the seed's luck. Logged nowhere: the stage gets no run."""
    top1 = {}
    with tempfile.TemporaryDirectory() as scratch:
        for seed in seeds:
            seeded = settings.model_copy(update={"train": settings.train.model_copy(update={"seed": seed})})
            pruned = prune(
                seeded, model_path=run_dir / "train" / "classifier.pt", dataset_dir=dataset, out_dir=Path(scratch) / str(seed)
            )
            model = load_classifier(pruned.model_path)
            top1[seed] = score(eager_predict_fn(model), dataset, model.classes, model.image_size)["lab"].metrics["top1"]
    return top1


def main(
    run_dir: Annotated[Path | None, typer.Option(help="a retraining run's work dir (train/, prune/)")] = None,
    batches: Annotated[list[int], typer.Option("--batch", help="batch sizes")] = list(SHIPPED_BATCH_SIZES),  # noqa: B006
    iterations: Annotated[int, typer.Option(help="timed calls per measurement")] = 1000,
    rounds: Annotated[int, typer.Option(help="alternating blocks the timed calls are split into")] = 20,
    prune_seeds: Annotated[list[int], typer.Option("--prune-seed", help="prune again with these recovery seeds")] = [],  # noqa: B006
    out: Annotated[Path, typer.Option(help="where the report and plot go")] = HERE,
) -> None:
    settings = get_settings()
    run_dir = run_dir or newest_run_dir(settings.work_dir)
    models = {
        "unpruned": load_classifier(run_dir / "train" / "classifier.pt"),
        "pruned": load_classifier(run_dir / "prune" / "pruned.pt"),
    }
    dataset = current_dataset(settings)
    typer.echo(f"models from {run_dir}; {torch.get_num_threads()} threads")
    quality = {
        name: {
            **score(eager_predict_fn(m), dataset, m.classes, m.image_size)["lab"].metrics,
            **dict(zip(("flops", "params"), count_flops(m), strict=True)),
        }
        for name, m in models.items()
    }
    peak = matmul_peak_gflops()
    timings: list[Timing] = []
    scratch = settings.work_dir / "benchmarks"
    for name, model in models.items():
        for batch in batches:
            x = np.random.default_rng(0).random((batch, 3, model.image_size, model.image_size), dtype=np.float32)
            reference = eager_predict_fn(model)(x)
            prepared = {}
            for runtime, prepare in RUNTIMES.items():
                started = time.perf_counter()
                with peak_rss_during() as memory:  # preparing it, and running it for a while
                    run = prepare(model, batch, scratch / name)
                    max_diff = float(np.abs(run(x) - reference).max())
                    time_calls(run, x, iterations // 10)
                prepared[runtime] = run, memory.peak_mib, max_diff, time.perf_counter() - started
            seconds = time_interleaved({runtime: run for runtime, (run, *_) in prepared.items()}, x, iterations, rounds)
            for runtime, (_, peak_mib, max_diff, setup_s) in prepared.items():
                timing = Timing(
                    name,
                    runtime,
                    batch,
                    seconds[runtime],
                    peak_mib,
                    quality[name]["flops"] * batch / 1e9,
                    max_diff,
                    setup_s,
                    rounds,
                )
                typer.echo(timing.line())
                timings.append(timing)
    write_report(out, timings, quality, peak, run_dir, pruned_top1_by_seed(run_dir, dataset, settings, prune_seeds))
    typer.echo(f"report: {out / 'REPORT.md'}")


if __name__ == "__main__":
    typer.run(main)
