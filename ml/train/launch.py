"""`train()` on several processes or hosts: the deepspeed launcher runs `ml.train.rank` on each."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from config import REPO_ROOT, Settings
from config.private import write_private
from ml.results import TrainResult
from ml.tracking import RunLog


def launch(settings: Settings, *, dataset_dir: Path, out_dir: Path, run: RunLog, warm_start: Path | None) -> TrainResult:
    """`deepspeed [--hostfile H | --num_gpus N] --module ml.train.rank`: rank 0 logs into `run`
    and leaves result.json next to the classifier."""
    cfg = settings.train
    hosts = ["--hostfile", str(cfg.hostfile)] if cfg.hostfile else ["--num_gpus", str(cfg.world_size)]
    settings_file = out_dir / "settings.json"  # every rank trains with exactly these settings
    write_private(settings_file, settings.model_dump_json())  # they may hold database passwords
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    command = [deepspeed, *hosts, "--master_port", str(cfg.master_port), "--no_local_rank", "--module", "ml.train.rank"]
    command += [str(dataset_dir), str(out_dir), str(settings_file), *(["--run-id", run.run_id] if run.run_id else [])]
    command += ["--warm-start", str(warm_start)] if warm_start else []
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    if run.tracking_uri:
        env["MLFLOW_TRACKING_URI"] = run.tracking_uri
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    (out_dir / "result.json").unlink(missing_ok=True)
    subprocess.run(command, env=env, check=True)
    return TrainResult.load(out_dir)
