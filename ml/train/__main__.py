"""`python -m ml.train --out-dir D [--dataset-dir DS] [--run-id ID]`: the train stage."""

from __future__ import annotations

import typer

from ml import cli
from ml.train import train


def main(out_dir: cli.OutDir, dataset_dir: cli.DatasetDir = None, run_id: cli.RunId = None) -> None:
    """Pretrain CoCa and fine-tune the species classifier; writes OUT_DIR/classifier.pt."""
    cli.run_stage(train, run_id, dataset_dir, out_dir=out_dir)


if __name__ == "__main__":
    typer.run(main)
