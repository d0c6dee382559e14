"""The benchmark report: a Markdown table and a latency plot, written into the repository."""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import psutil
import torch

from benchmarks.measure import Timing


def _speedups(timings: list[Timing]) -> dict[tuple[str, int, str], float]:
    eager = {(t.model, t.batch): t.median_ms for t in timings if t.runtime == "eager"}
    return {(t.model, t.batch, t.runtime): eager[(t.model, t.batch)] / t.median_ms for t in timings}


def write_report(
    out: Path,
    timings: list[Timing],
    quality: dict[str, dict],
    peak_gflops: float,
    run_dir: Path,
    pruned_top1_by_seed: dict[int, float] | None = None,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _plot(out / "latency.png", timings)
    speedup = _speedups(timings)
    before, after = quality["unpruned"], quality["pruned"]
    lines = [
        "# Inference benchmark",
        "",
        (
            f"`python -m benchmarks` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {platform.processor() or platform.machine()}, "
            f"{psutil.cpu_count()} logical cores, {torch.get_num_threads()} torch threads. Models from `{run_dir}`."
        ),
        "",
        (
            "All runtimes run on the CPU. The CUDA libraries the compile step cross-compiles for sm_80 and sm_90 are checked "
            "for their kernels by `tests/model/test_prune_compile.py`; their parity and latency on a GPU are not measured here"
            f"{'' if torch.cuda.is_available() else ' (this machine has no GPU)'}."
        ),
        "",
        "## Pruning",
        "",
        "| model | FLOPs/image | params | test top-1 | test top-5 | macro-F1 |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {q['flops'] / 1e6:.1f} M | {q['params'] / 1e6:.2f} M | "
            f"{q['top1']:.3f} | {q['top5']:.3f} | {q['macro_f1']:.3f} |"
            for name, q in quality.items()
        ),
        "",
        f"FLOPs: **{1 - after['flops'] / before['flops']:.1%} fewer**; test top-1 {_top1_change(before['top1'], after['top1'])}.",
        "",
        *_seed_spread(before["top1"], pruned_top1_by_seed or {}),
        "## Latency, throughput, memory",
        "",
        (
            "FLOPs count 2 per multiply-add (torch's FLOP counter: matmuls, convolution, attention); "
            "this CPU's measured fp32 peak (2048² matmul through PyTorch's BLAS) is "
            f"**{peak_gflops:.0f} GFLOP/s**. Memory is the peak resident memory added while a runtime was prepared and timed "
            "(one process: what earlier runtimes left resident is not counted again). `diff` is the max abs logit "
            "difference from eager on the same input."
        ),
        "",
        "| model | batch | runtime | median ms | p99 ms | images/s | vs eager | GFLOP/s | % of peak | +MiB | diff | setup s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {t.model} | {t.batch} | {t.runtime} | {t.median_ms:.3f} | {t.p99_ms:.3f} | {t.images_per_s:.0f} | "
            f"{speedup[(t.model, t.batch, t.runtime)]:.2f}× | {t.gflops:.1f} | {t.gflops / peak_gflops:.1%} | {t.peak_mib:.0f} | "
            f"{t.max_abs_diff:.1e} | {t.setup_s:.0f} |"
            for t in timings
        ),
        "",
        "![latency](latency.png)",
        "",
        *_head_to_head(timings, "tvm", "onnxruntime"),
    ]
    (out / "REPORT.md").write_text("\n".join(lines))


def _top1_change(before: float, after: float) -> str:
    points = round((after - before) * 100, 1)
    if points == 0:
        return "**unchanged**"
    return f"{'gained' if points > 0 else 'lost'} **{abs(points):.1f} points**"


def _seed_spread(unpruned_top1: float, pruned_top1_by_seed: dict[int, float]) -> list[str]:
    if not pruned_top1_by_seed:
        return []
    change = {seed: (top1 - unpruned_top1) * 100 for seed, top1 in pruned_top1_by_seed.items()}  # negative: lost
    return [
        (
            f"Pruned again from the same unpruned model, one recovery fine-tune per seed (`--prune-seed`): test top-1 "
            f"changed by {', '.join(f'{points:+.1f} (seed {seed})' for seed, points in change.items())} points; "
            f"the worst seed **{min(change.values()):+.1f}**, the mean {np.mean(list(change.values())):+.1f}."
        ),
        "",
    ]


def _head_to_head(timings: list[Timing], runtime: str, rival: str) -> list[str]:
    """Round-by-round ratios of two runtimes' median latencies: each round timed both within a
    few seconds, so a neighbour's load drifting over minutes cancels out of the ratio."""
    by_key = {(t.model, t.batch, t.runtime): t for t in timings}
    pairs = [
        (by_key[(t.model, t.batch, runtime)], t) for t in timings if t.runtime == rival and (t.model, t.batch, runtime) in by_key
    ]
    if not pairs:
        return []
    lines = [
        f"## {runtime} against {rival}, round by round",
        "",
        (
            f"Each round times every runtime in turn; the ratio is {runtime}'s median over {rival}'s in the same round "
            "(below 1: faster)."
        ),
        "",
        f"| model | batch | rounds {runtime} was faster | median ratio | middle half of the ratios |",
        "|---|---|---|---|---|",
    ]
    for ours, theirs in pairs:
        ratios = ours.round_medians_ms / theirs.round_medians_ms
        low, high = np.percentile(ratios, [25, 75])
        lines.append(
            f"| {ours.model} | {ours.batch} | {int((ratios < 1).sum())} of {len(ratios)} | "
            f"{np.median(ratios):.2f} | {low:.2f}–{high:.2f} |"
        )
    return [*lines, ""]


def _plot(path: Path, timings: list[Timing]) -> None:
    groups = sorted({(t.model, t.batch) for t in timings}, key=lambda g: (g[1], g[0] != "unpruned"))
    runtimes = list(dict.fromkeys(t.runtime for t in timings))
    by_key = {(t.model, t.batch, t.runtime): t for t in timings}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(runtimes)
    for i, runtime in enumerate(runtimes):
        medians = [by_key[(m, b, runtime)].median_ms / b for m, b in groups]
        ax.bar([g + i * width for g in range(len(groups))], medians, width, label=runtime)
    ax.set_xticks([g + width * (len(runtimes) - 1) / 2 for g in range(len(groups))], [f"{m}\nbatch {b}" for m, b in groups])
    ax.set_ylabel("median ms per image (lower is better)")
    ax.set_title("Insect classifier inference on this CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
