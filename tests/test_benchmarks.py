"""The benchmark's measurements and report (the full run is `python -m benchmarks`)."""

import numpy as np

from benchmarks.measure import Timing, peak_rss_during, time_calls, time_interleaved
from benchmarks.report import write_report


def test_time_calls_times_every_call_after_warmup():
    calls = []
    seconds = time_calls(lambda x: calls.append(x) or x, np.zeros(1), iterations=7, warmup=3)
    assert len(calls) == 10 and seconds.shape == (7,) and (seconds > 0).all()


def test_peak_rss_sees_a_large_allocation():
    with peak_rss_during() as memory:
        block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
        del block
    assert memory.peak_mib > 40


def test_report_tables_speedups_against_eager_and_draws_the_plot(tmp_path):
    def timing(model, runtime, ms):
        return Timing(model, runtime, 1, np.full(10, ms / 1e3), 1.0, 0.26, 0.0, 1.0)

    timings = [timing(m, r, ms) for m in ("unpruned", "pruned") for r, ms in (("eager", 4.0), ("tvm", 2.0))]
    quality = {"unpruned": {"flops": 200e6, "params": 2e6, "top1": 0.90, "top5": 1.0, "macro_f1": 0.9},
               "pruned": {"flops": 120e6, "params": 1e6, "top1": 0.89, "top5": 1.0, "macro_f1": 0.88}}
    write_report(tmp_path, timings, quality, peak_gflops=300.0, run_dir=tmp_path)
    report = (tmp_path / "REPORT.md").read_text()
    assert "**40.0% fewer**" in report and "lost **1.0 points**" in report
    assert "| unpruned | 1 | tvm | 2.000 | 2.000 | 500 | 2.00× |" in report
    assert (tmp_path / "latency.png").stat().st_size > 0


def test_interleaved_timing_alternates_between_runtimes():
    calls = []
    runs = {name: (lambda x, name=name: calls.append(name)) for name in ("a", "b")}
    seconds = time_interleaved(runs, np.zeros(1), iterations=20, rounds=5)
    assert {name: len(times) for name, times in seconds.items()} == {"a": 20, "b": 20}
    assert calls[:6] == ["a"] * 6 and calls[6:12] == ["b"] * 6 and calls[12:18] == ["a"] * 6  # 2 warm-up + 4 timed per block


def test_report_compares_tvm_with_onnx_runtime_round_by_round(tmp_path):
    def timing(runtime, round_ms):  # 2 calls per round
        return Timing("pruned", runtime, 1, np.repeat(np.array(round_ms) / 1e3, 2), 1.0, 0.15, 0.0, 1.0, rounds=len(round_ms))

    # ONNX Runtime's rounds drift from 2 to 4 ms; TVM is faster in 3 of the 4 same-round pairs
    timings = [timing("eager", [5, 5, 5, 5]), timing("onnxruntime", [2, 3, 4, 4]), timing("tvm", [1.8, 2.7, 4.4, 3.6])]
    quality = {name: {"flops": 1e8, "params": 1e6, "top1": 0.9, "top5": 1.0, "macro_f1": 0.9} for name in ("unpruned", "pruned")}
    write_report(tmp_path, timings, quality, peak_gflops=300.0, run_dir=tmp_path)
    assert "| pruned | 1 | 3 of 4 | 0.90 | 0.90–0.95 |" in (tmp_path / "REPORT.md").read_text()
