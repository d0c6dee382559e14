"""`python -m ml.data generate`: write the synthetic dataset where the config says (or --out)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from config import get_settings
from config.cli import exit_on
from ml.data.synthetic import generate_synthetic

app = typer.Typer(add_completion=False)


@app.command()
def generate(
    out: Annotated[
        Path | None, typer.Option(help="an empty or earlier generated directory (default: data/datasets/synthetic)")
    ] = None,
) -> None:
    """Draw the synthetic dataset; a directory holding anything else (IP102) is never touched."""
    settings = get_settings()
    with exit_on(FileExistsError):
        root = generate_synthetic(out or settings.synthetic_dataset_dir, settings.synthetic)
    typer.echo(f"synthetic dataset in {root}")


@app.callback()
def main() -> None:
    """Dataset tools."""


if __name__ == "__main__":
    app()
