"""One rank of `train()` under the deepspeed launcher: `deepspeed --num_gpus 2 --module ml.train.rank
DATASET_DIR OUT_DIR SETTINGS_JSON [--run-id ID]` (what `train()` runs when `train.world_size` > 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from config import Settings
from ml.tracking import RunLog
from ml.train import train_here


def main(
    dataset_dir: Annotated[Path, typer.Argument(help="a dataset in the IP102 layout")],
    out_dir: Annotated[Path, typer.Argument(help="checkpoints and the classifier go here")],
    settings_json: Annotated[Path, typer.Argument(help="the launching process's settings")],
    run_id: Annotated[str | None, typer.Option(help="the MLflow run rank 0 logs into")] = None,
) -> None:
    settings = Settings.model_validate_json(settings_json.read_text())
    train_here(settings, dataset_dir=dataset_dir, out_dir=out_dir, run=RunLog.of(settings, run_id))


if __name__ == "__main__":
    typer.run(main)
