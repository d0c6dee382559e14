"""`python -m ml.train --out-dir D [--dataset-dir DS] [--run-id ID] [--warm-start W]`: the train stage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ml import cli
from ml.train import train

WarmStart = Annotated[Path | None, typer.Option(help="weights.pt of an earlier train stage to start from")]


def main(out_dir: cli.OutDir, dataset_dir: cli.DatasetDir = None, run_id: cli.RunId = None, warm_start: WarmStart = None) -> None:
    """Pretrain CoCa and fine-tune the species classifier (or fine-tune earlier weights);
    writes OUT_DIR/classifier.pt and OUT_DIR/weights.pt."""
    cli.run_stage(train, run_id, dataset_dir, out_dir=out_dir, warm_start=warm_start)


if __name__ == "__main__":
    typer.run(main)
