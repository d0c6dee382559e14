"""Timing, memory and peak-throughput measurements shared by the benchmark runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import psutil
import torch


@dataclass(frozen=True)
class Timing:
    model: str
    runtime: str
    batch: int
    seconds: np.ndarray  # one per timed call
    peak_mib: float  # resident memory above the level before this runtime was prepared
    gflop_per_call: float
    max_abs_diff: float  # against eager PyTorch on the same input
    setup_s: float  # export, compile or tuning, plus the timed calls
    rounds: int = 1  # `seconds` holds this many equal blocks, timed in alternation with the other runtimes

    @property
    def round_medians_ms(self) -> np.ndarray:
        return np.median(self.seconds.reshape(self.rounds, -1), axis=1) * 1e3

    @property
    def median_ms(self) -> float:
        return float(np.median(self.seconds) * 1e3)

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(self.seconds, 99) * 1e3)

    @property
    def images_per_s(self) -> float:
        return self.batch / float(np.median(self.seconds))

    @property
    def gflops(self) -> float:
        return self.gflop_per_call / float(np.median(self.seconds))

    def line(self) -> str:
        return (
            f"{self.model:>8} {self.runtime:>13} b{self.batch:<2} median {self.median_ms:8.3f} ms  p99 {self.p99_ms:8.3f} ms  "
            f"{self.images_per_s:8.1f} img/s  {self.gflops:6.1f} GFLOP/s  +{self.peak_mib:6.1f} MiB  diff {self.max_abs_diff:.1e}"
        )


def time_calls(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, iterations: int, warmup: int = 10) -> np.ndarray:
    for _ in range(warmup):
        run(x)
    seconds = np.empty(iterations)
    for i in range(iterations):
        start = time.perf_counter()
        run(x)
        seconds[i] = time.perf_counter() - start
    return seconds


def time_interleaved(
    runs: dict[str, Callable[[np.ndarray], np.ndarray]], x: np.ndarray, iterations: int, rounds: int = 10
) -> dict[str, np.ndarray]:
    """Per-call seconds of each run, timed in `rounds` alternating blocks: a noisy neighbour on
    a shared machine slows every runtime alike instead of whichever happened to be running."""
    blocks: dict[str, list[np.ndarray]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            blocks[name].append(time_calls(run, x, max(1, iterations // rounds), warmup=2))
    return {name: np.concatenate(times) for name, times in blocks.items()}


class _PeakRss:
    peak_mib = 0.0


@contextmanager
def peak_rss_during(interval_s: float = 0.005) -> Iterator[_PeakRss]:
    """The process's peak resident memory above its level at entry, sampled in a thread."""
    process, result, done = psutil.Process(), _PeakRss(), threading.Event()
    baseline = process.memory_info().rss

    def sample() -> None:
        peak = baseline
        while not done.wait(interval_s):
            peak = max(peak, process.memory_info().rss)
        result.peak_mib = (max(peak, process.memory_info().rss) - baseline) / 2**20

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """This CPU's practical fp32 peak: the best of a few large matmuls through PyTorch's BLAS."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start
