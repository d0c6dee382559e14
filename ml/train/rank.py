"""One rank of `train()` under the deepspeed launcher: `deepspeed --num_gpus 2 --module ml.train.rank
DATASET_DIR OUT_DIR SETTINGS_JSON [--run-id ID]` (what `train()` runs when `train.world_size` > 1)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import torch.distributed as dist
import typer

from config import Settings
from ml.tracking import RunLog
from ml.train import train_here


def shut_down() -> None:
    """Leave together: a rank that exits while another still writes the classifier closes gloo's
    connections under it (seen as SIGABRT, exit 250). Then remove the /dev/shm all-reduce buffers
    DeepSpeed's CPU backend maps (69 MB a rank) and never unlinks: a worker would fill its
    /dev/shm a training run at a time. Unlinking while mapped is safe."""
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    if os.environ.get("LOCAL_RANK", "0") == "0":  # one per host: each host has its own /dev/shm
        pattern = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_*"
        for buffer in Path("/dev/shm").glob(pattern):
            buffer.unlink(missing_ok=True)


def main(
    dataset_dir: Annotated[Path, typer.Argument(help="a dataset in the IP102 layout")],
    out_dir: Annotated[Path, typer.Argument(help="checkpoints and the classifier go here")],
    settings_json: Annotated[Path, typer.Argument(help="the launching process's settings")],
    run_id: Annotated[str | None, typer.Option(help="the MLflow run rank 0 logs into")] = None,
    warm_start: Annotated[Path | None, typer.Option(help="weights to start from")] = None,
) -> None:
    settings = Settings.model_validate_json(settings_json.read_text())
    train_here(settings, dataset_dir=dataset_dir, out_dir=out_dir, run=RunLog.of(settings, run_id), warm_start=warm_start)
    shut_down()


if __name__ == "__main__":
    typer.run(main)
