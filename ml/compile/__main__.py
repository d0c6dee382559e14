"""`python -m ml.compile --model pruned.pt --out-dir D [--run-id ID]`: the compile stage."""

from __future__ import annotations

import typer

from ml import cli
from ml.compile import compile_model


def main(model_path: cli.ModelPath, out_dir: cli.OutDir, dataset_dir: cli.DatasetDir = None, run_id: cli.RunId = None) -> None:
    """Export the classifier and build its TVM libraries (host CPU, tuned; CUDA when nvcc exists)."""
    cli.run_stage(compile_model, run_id, dataset_dir, model_path=model_path, out_dir=out_dir)


if __name__ == "__main__":
    typer.run(main)
