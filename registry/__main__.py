"""`python -m registry`: list the registered model's versions, promote one to champion, roll back."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import mlflow
import typer
from mlflow import MlflowClient

from config import get_settings
from registry import promote as promote_version
from registry import rollback as rollback_champion
from registry.tracking import configure

app = typer.Typer(add_completion=False, help=__doc__)


def _versions(name: str) -> list:
    """Versions in order; fetched one by one because search results leave `aliases` empty."""
    client = MlflowClient()
    numbers = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    return [client.get_model_version(name, str(n)) for n in numbers]


@app.command("list")
def list_versions() -> None:
    """Every version with its aliases and test metrics."""
    settings = get_settings()
    configure(settings)
    name = settings.registered_model_name
    versions = _versions(name)
    if not versions:
        typer.echo(f"no versions of {name!r} in {settings.tracking_uri}")
        raise typer.Exit(1)
    for v in versions:
        metrics = mlflow.get_run(v.run_id).data.metrics
        scores = "  ".join(f"{k}={metrics[k]:.3f}" for k in ("top1", "top5", "macro_f1") if k in metrics)
        dataset = Path(v.tags.get("dataset_dir", "?")).name
        typer.echo(f"{name} v{v.version:<3} {','.join(v.aliases) or '-':<22} {scores}  dataset={dataset}")


@app.command()
def promote(version: Annotated[str, typer.Argument(help="model version to make champion")]) -> None:
    """Set alias `champion` on a version (the same as in the MLflow UI)."""
    settings = get_settings()
    configure(settings)
    promote_version(settings.registered_model_name, version)
    typer.echo(f"{settings.registered_model_name} v{version} is now champion")


@app.command()
def rollback() -> None:
    """Give `champion` back to the version that held it before the current one."""
    settings = get_settings()
    configure(settings)
    try:
        version = rollback_champion(settings.registered_model_name)
    except LookupError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(1) from error
    typer.echo(f"{settings.registered_model_name} v{version} is champion again")


@app.command()
def summary() -> None:
    """The versions, then the commands that open the UIs."""
    list_versions()
    settings = get_settings()
    typer.echo(f"""
MLflow UI:   mlflow ui --backend-store-uri {settings.tracking_uri} --port 5000   -> http://localhost:5000/#/models/{settings.registered_model_name}
Airflow UI:  source .venv/bin/activate && eval "$(python -m config airflow-env)" && airflow standalone   -> http://localhost:8080""")


if __name__ == "__main__":
    app()
