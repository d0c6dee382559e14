"""What every stage's command line shares: `python -m ml.<stage> --out-dir DIR [--run-id ID] ...`
runs the stage on the configured settings and prints its result record as JSON (also written to
DIR/result.json, where the next stage's command can find it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from config import get_settings
from ml.results import StageResult
from ml.tracking import RunLog

DatasetDir = Annotated[
    Path | None, typer.Option(help="a dataset in the IP102 layout (default: the newest version, else the base dataset)")
]
ModelPath = Annotated[Path, typer.Option("--model", help="a classifier written by the train or prune stage (.pt)")]
OutDir = Annotated[Path, typer.Option(help="where the stage writes its files and result.json")]
RunId = Annotated[str | None, typer.Option(help="an MLflow run to log into (default: log nothing)")]


def run_stage(stage: Callable[..., StageResult], run_id: str | None, dataset_dir: Path | None, **inputs) -> StageResult:
    """Call `stage(settings, dataset_dir=..., run=..., **inputs)` and print its result."""
    from ml.data.versions import current_dataset

    settings = get_settings()
    dataset = dataset_dir or current_dataset(settings)
    with RunLog.of(settings, run_id).recording() as run:
        result = stage(settings, dataset_dir=dataset, run=run, **inputs)
    typer.echo(result.model_dump_json(indent=2))
    return result
