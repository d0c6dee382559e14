"""`python -m ml.data generate`: write the synthetic dataset where the config says (or --out)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from config import get_settings
from ml.data.synthetic import generate_synthetic

app = typer.Typer(add_completion=False)


@app.command()
def generate(out: Annotated[Path | None, typer.Option(help="dataset root (default: the configured dataset dir)")] = None) -> None:
    settings = get_settings()
    root = generate_synthetic(out or settings.base_dataset_dir, settings.synthetic)
    typer.echo(f"synthetic dataset written to {root}")


@app.callback()
def main() -> None:
    """Dataset tools."""


if __name__ == "__main__":
    app()
