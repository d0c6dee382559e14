"""The benchmark's measurements and report (the full run is `python -m benchmarks`)."""

import contextlib
import copy
import json
import time

import mlflow
import numpy as np
import pytest
import torch
import typer

from benchmarks import hostile, learning
from benchmarks.__main__ import pruned_top1_by_seed
from benchmarks.measure import Timing, peak_rss_during, time_calls, time_interleaved
from benchmarks.report import write_report
from ml.data import read_classes
from ml.model import SpeciesClassifier, build_coca


def test_time_calls_times_every_call_after_warmup():
    calls = []
    seconds = time_calls(lambda x: calls.append(x) or x, np.zeros(1), iterations=7, warmup=3)
    assert len(calls) == 10 and seconds.shape == (7,) and (seconds > 0).all()


def test_peak_rss_sees_a_large_allocation():
    with peak_rss_during() as memory:
        block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
        time.sleep(0.1)  # held while the sampler runs: np.ones keeps the GIL, and a busy machine may not switch sooner
        del block
    assert memory.peak_mib > 40


def test_report_tables_speedups_against_eager_and_draws_the_plot(tmp_path):
    def timing(model, runtime, ms):
        return Timing(model, runtime, 1, np.full(10, ms / 1e3), 1.0, 0.26, 0.0, 1.0)

    timings = [timing(m, r, ms) for m in ("unpruned", "pruned") for r, ms in (("eager", 4.0), ("tvm", 2.0))]
    quality = {
        "unpruned": {"flops": 200e6, "params": 2e6, "top1": 0.90, "top5": 1.0, "macro_f1": 0.9},
        "pruned": {"flops": 120e6, "params": 1e6, "top1": 0.89, "top5": 1.0, "macro_f1": 0.88},
    }
    write_report(tmp_path, timings, quality, peak_gflops=300.0, run_dir=tmp_path, pruned_top1_by_seed={0: 0.89, 1: 0.91})
    report = (tmp_path / "REPORT.md").read_text()
    assert "**40.0% fewer**" in report and "lost **1.0 points**" in report
    assert "changed by -1.0 (seed 0), +1.0 (seed 1) points; the worst seed **-1.0**, the mean +0.0." in report
    assert "| unpruned | 1 | tvm | 2.000 | 2.000 | 500 | 2.00× |" in report
    assert (tmp_path / "latency.png").stat().st_size > 0

    quality["pruned"]["top1"] = 0.90
    write_report(tmp_path, timings, quality, peak_gflops=300.0, run_dir=tmp_path)
    assert "test top-1 **unchanged**" in (tmp_path / "REPORT.md").read_text()


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


def test_pruning_again_per_seed_scores_each_seed_and_logs_nothing(settings, tmp_path):
    """That the same seed gives the same pruned weights is test_prune_compile's."""
    torch.manual_seed(0)
    model = SpeciesClassifier.from_coca(build_coca("coca_tiny", vocab_size=50), read_classes(settings.base_dataset_dir))
    (tmp_path / "train").mkdir()
    torch.save(model, tmp_path / "train" / "classifier.pt")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mine.db'}")
    top1 = pruned_top1_by_seed(tmp_path, settings.base_dataset_dir, settings, [0, 1])
    assert set(top1) == {0, 1} and all(0.0 <= score <= 1.0 for score in top1.values())
    assert not (tmp_path / "mine.db").exists() and mlflow.active_run() is None  # a stage without a run logs nowhere


@pytest.mark.slow
def test_learning_benchmark_runs_rounds_gates_each_and_reports_what_it_measured(settings, tmp_path):
    """A smoke version of `python -m benchmarks.learning` on the tiny dataset and model."""
    learning.main(work_dir=tmp_path / "work", report_dir=tmp_path / "report", round_sizes=[8, 8], fresh=40, seeds=[0, 1])
    results = json.loads((tmp_path / "report" / "learning.json").read_text())
    assert [r["photos"] for r in results["rounds"]] == [8, 16]
    served = results["seeds"][0]
    for r in results["rounds"]:  # the champion after a round is the candidate exactly when the gate promoted it
        assert r["champion"] == (r["candidate"] if r["promoted"] else served)
        served = r["champion"]
    assert all(0 < p <= 1 for p in results["drift_p"].values())
    assert all(m["lab"]["total"] == 40 and m["field"]["total"] == 40 for m in results["seeds"])
    report = (tmp_path / "report" / "LEARNING.md").read_text()
    assert "| seed 1 |" in report and "| 16 | v0002 |" in report and (tmp_path / "report" / "learning.png").stat().st_size > 0


def _hostile_results(p99_ms: float = 30.0, failed: int = 0, form_status: int = 413, form_sent: int = 70_000, grown: int = 0):
    """`python -m benchmarks.hostile`'s results, made up: alone p99 10 ms, the other phases as given."""

    def phase(p99: float, failed: int = 0) -> dict:
        statuses = {"200": 100 - failed} | ({"503": failed} if failed else {})
        quantiles = list(np.linspace(5, p99, len(hostile.QUANTILES)))
        return {
            "requests": 100,
            "failed": failed,
            "statuses": statuses,
            "p50_ms": 5.0,
            "p99_ms": p99,
            "quantiles_ms": quantiles,
            "service_cores": 1.0,
        }

    answers = {"HTTP/1.1 303 See Other": {"count": 900, "median_sent": 0, "max_sent": 120, "median_s": 0.01}}
    forms = [
        {
            "framing": framing,
            "bytes": 200_000_000,
            "status_line": f"HTTP/1.1 {form_status} X",
            "status": form_status,
            "seconds": 0.01,
            "sent": form_sent,
        }
        for framing in ("Content-Length", "chunked")
    ]
    metrics = {"status": 200, "bytes": 28_000, "samples": 400, "request_total_samples": 20}
    return {
        "phases": {"alone": phase(10.0), "made-up keys": phase(p99_ms, failed), "slow uploads": phase(12.0)},
        "hostile": {
            "made-up keys": {
                "requests": 5000,
                "statuses": {"401": 100, "429": 4900},
                "connections": 64,
                "processes": 4,
                "cores": 0.8,
                "window_s": 24,
            },
            "slow uploads": {
                "uploads": 900,
                "answers": answers,
                "connections": 300,
                "processes": 1,
                "cores": 0.5,
                "window_s": 24,
            },
        },
        "big_forms": forms,
        "unknown_paths": {
            "requests": 2000,
            "statuses": {"404": 2000},
            "before": metrics,
            "after": metrics | {"samples": 400 + grown},
        },
        "service": {
            "model": {"backend": "tvm-cpu"},
            "workers": 1,
            "max_in_flight": 256,
            "key_rate_limits": "none",
            "unknown_key_limit": "30/minute",
            "stranger_delay_s": 1.0,
            "max_form_bytes": 16384,
            "max_image_bytes": 5242880,
            "database": "postgresql://x",
            "image_store": "local files",
        },
        "date": "2026-12-07 12:00 UTC",
        "machine": {"cores": 2, "cpu": "x86_64"},
        "seconds": 20,
        "served": "a model",
    }


@pytest.mark.parametrize(
    ("changes", "failing"),
    [
        ({}, set()),
        ({"p99_ms": 31.0}, {"made-up keys: p99 within 3x alone"}),
        ({"failed": 1}, {"made-up keys: no failed requests"}),
        (
            {"form_status": 403},
            {"200 MB form (Content-Length): 413 before it is read", "200 MB form (chunked): 413 before it is read"},
        ),
        (
            {"form_sent": 100_000_000},
            {"200 MB form (Content-Length): 413 before it is read", "200 MB form (chunked): 413 before it is read"},
        ),
        ({"grown": 3}, {"2000 made-up paths: /metrics keeps its samples"}),
    ],
)
def test_hostile_benchmark_fails_each_criterion_it_should_and_exits_1(changes, failing, monkeypatch, tmp_path):
    """The verdicts, the report and the exit status of `python -m benchmarks.hostile`, on made-up figures."""
    results = _hostile_results(**changes)
    monkeypatch.setattr(hostile, "served_model", lambda tmp: contextlib.nullcontext((None, None, "a model")))
    monkeypatch.setattr(hostile, "measure", lambda *args: copy.deepcopy(results))
    if failing:
        with pytest.raises(typer.Exit) as exited:
            hostile.main(report_dir=tmp_path)
        assert exited.value.exit_code == 1
    hostile.main(report_dir=tmp_path, fail=False)  # --no-fail: whatever failed, exit 0
    written = json.loads((tmp_path / "hostile.json").read_text())
    assert {name for name, ok in written["verdicts"].items() if not ok} == failing
    assert len(written["verdicts"]) == 7 and written["passed"] == (not failing)
    report = (tmp_path / "HOSTILE.md").read_text()
    assert f"**{'FAIL' if failing else 'PASS'}**: {7 - len(failing)} of 7 criteria pass." in report
    assert (
        "| made-up keys | 100 |" in report and "401 × 100, 429 × 4900" in report and "| HTTP/1.1 303 See Other | 900 |" in report
    )
    assert all(f"**FAIL** {name}" in report for name in failing) and (tmp_path / "hostile.png").stat().st_size > 0
