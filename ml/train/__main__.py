"""One rank of `train()` under the deepspeed launcher: `deepspeed --num_gpus 2 --module ml.train
DATASET_DIR OUT_DIR SETTINGS_JSON` (what `train()` runs when `train.world_size` > 1). Rank 0 logs
into the MLflow run named by MLFLOW_RUN_ID, when set."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import mlflow
import typer

from config import Settings
from ml.train import is_rank0, train_here


def main(
    dataset_dir: Annotated[Path, typer.Argument(help="a dataset in the IP102 layout")],
    out_dir: Annotated[Path, typer.Argument(help="checkpoints and the classifier go here")],
    settings_json: Annotated[Path, typer.Argument(help="the launching process's settings")],
) -> None:
    settings = Settings.model_validate_json(settings_json.read_text())
    logging = mlflow.start_run(run_id=os.environ.get("MLFLOW_RUN_ID")) if is_rank0() else nullcontext()
    with logging:
        train_here(settings, dataset_dir, out_dir)


if __name__ == "__main__":
    typer.run(main)
