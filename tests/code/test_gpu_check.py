"""The GPU check (`python -m benchmarks.gpu`): its dry run here, where there is no GPU, and its
report from the figures a GPU run produces."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from benchmarks.gpu import RUNTIMES, Check, Outcome, Sizes, check_settings, deepspeed_config_for
from benchmarks.gpu_report import NOT_RUN, write_gpu_report
from benchmarks.measure import Timing
from config import REPO_ROOT, get_settings


def test_gpus_train_with_zero2_in_bf16_and_cpus_with_the_fp32_config(tmp_path):
    assert deepspeed_config_for(0).name == "ds_config.json"
    assert deepspeed_config_for(1).name == deepspeed_config_for(8).name == "ds_config_zero2_gpu.json"
    settings = check_settings(get_settings(), "coca_base", 2, tmp_path, Sizes.default(dry_run=False), dry_run=False)
    assert (settings.train.world_size, settings.train.pretrain_epochs, settings.train.max_steps_per_epoch) == (2, 2, None)
    assert settings.synthetic.image_size == 512  # the base config's
    assert settings.data_dir == tmp_path / "data" and settings.feedback.database_url is None


@pytest.mark.slow
def test_the_dry_run_builds_trains_prunes_cross_compiles_serves_and_reports(tmp_path):
    """The real command, as CI runs it: every step that needs no GPU runs, the others are
    skipped with the reason, and the report marks each GPU figure "not run yet"."""
    work = Path(tempfile.mkdtemp(prefix="insect-gpu-check-"))  # as root, PostgreSQL runs as `postgres`: not in tmp_path
    os.chmod(work, 0o755)
    command = [sys.executable, "-m", "benchmarks.gpu", "--dry-run", "--model", "coca_tiny", "--batch", "1", "--batch", "8"]
    try:
        done = subprocess.run(
            [*command, "--work", str(work), "--out", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert (work / "compile" / "model_cuda_sm_90_tuned_b8.so").stat().st_size > 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = (tmp_path / "GPU_REPORT.md").read_text()
    for step in ("environment", "model configs", "dataset", "training", "pruning", "cuda library", "tuned libraries", "serving"):
        assert f"| {step} | ran |" in report
    for step in ("parity", "timings", "tuned timings"):
        assert f"| {step} | skipped |" in report
    assert "`ds_config_zero2_gpu.json`, world size 1, global batch 8, 1 × 2 steps per stage" in report  # the GPU's, on the CPU
    assert "| coca_base | 512 |" in report  # every config built
    assert "backend `torch-eager`" in report  # a CUDA library loads only on a GPU
    assert report.count(f"| {NOT_RUN} |") >= 2 * len(RUNTIMES) + 2


def _timing(runtime: str, batch: int, ms: float) -> Timing:
    return Timing("pruned", runtime, batch, np.full(20, ms / 1e3), 0.0, 1.0, 1e-5, 1.0, rounds=2)


def test_a_gpu_run_reports_speed_memory_parity_latency_and_serving(tmp_path):
    settings = check_settings(get_settings(), "coca_base", 1, tmp_path, Sizes.default(dry_run=False), dry_run=False)
    check = Check(settings, tmp_path, dry_run=False, gpus=1, arch="sm_90", batches=[1, 32], iterations=20, tuning_trials=192)
    check.outcomes = [Outcome("training", "ran", 41.5, "ds_config_zero2_gpu.json at world size 1")]
    check.figures = {
        "environment": {"gpus": ["NVIDIA H200"], "arch": "sm_90", "cuda": "13.0", "torch": "2.14.1", "cpu_cores": 16},
        "training": {
            "model": "coca_base",
            "deepspeed_config": "ds_config_zero2_gpu.json",
            "device": "GPU",
            "world_size": 1,
            "batch_size": 32,
            "epochs": 2,
            "steps_per_epoch": 5,
            "coca_steps_per_s": 5.0,
            "coca_peak_gpu_mib": 10240.0,
            "classifier_steps_per_s": 8.0,
            "classifier_peak_gpu_mib": 4096.0,
        },
        "parity": {"max_abs_diff": 2.5e-5, "top1_agreement": 1.0},
        "timings": [_timing("eager", 1, 4.0), _timing("tvm-cuda", 1, 2.0), _timing("eager", 32, 8.0)],
        "timings_skipped": ["onnxruntime-cuda: this onnxruntime has no CUDAExecutionProvider"],
        "serving": {"backend": "tvm-cuda", "species": "rice leaf roller"},
    }
    report = write_gpu_report(tmp_path, check).read_text()
    assert "a run on the GPU below" in report and "| GPU | 1 × NVIDIA H200 (sm_90) |" in report
    assert "global batch 32, 2 × 5 steps per stage" in report
    assert "| CoCa pretraining | 5.00 | 160.0 | 10.00 |" in report
    assert "| classifier fine-tune | 8.00 | 256.0 | 4.00 |" in report
    assert "| 2.5e-05 | 1.0000 |" in report
    assert "| 1 | tvm-cuda | 2.000 | 2.000 | 500 | 2.00× | 1.0e-05 |" in report
    assert f"| 32 | tvm-cuda | {NOT_RUN} |" in report  # what a run did not measure stays marked
    assert "Skipped: onnxruntime-cuda: this onnxruntime has no CUDAExecutionProvider." in report
    assert "backend `tvm-cuda`, answered 'rice leaf roller'." in report
    assert "| tuned libraries | not reached | | the run ended before this step |" in report  # only training ran
    assert "dry run" not in report
