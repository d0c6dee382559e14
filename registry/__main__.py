"""`python -m registry`: register a retraining run's model, list the versions, promote one to
champion, roll back."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import mlflow
import typer
from mlflow.exceptions import MlflowException

from config import Settings, get_settings
from config.cli import exit_on
from ml.results import CompileResult, Evaluation, ValidationSummary
from ml.tracking import RunLog, configure
from registry import all_versions, gate_summary, resign_versions, signing
from registry import promote as promote_version
from registry import register as register_version
from registry import rollback as rollback_champion

app = typer.Typer(add_completion=False, help=__doc__)
signing_key = typer.Typer(help="The key the register stage signs model versions with (README: Security).")
app.add_typer(signing_key, name="signing-key")


def _registry() -> Settings:
    """The settings, with MLflow pointed at their registry, which is said on stderr."""
    settings = get_settings()
    configure(settings)
    typer.echo(f"registry: {settings.tracking_uri}", err=True)
    return settings


@app.command()
def register(
    run_dir: Annotated[Path, typer.Option(help="a retraining run's work dir: validate/, compile/ and evaluate/ results")],
    run_id: Annotated[str | None, typer.Option(help="the MLflow run to log the model into (default: a new one)")] = None,
) -> None:
    """Register the compiled model of a run as a new version; the gate decides on champion."""
    settings = get_settings()
    run = RunLog.of(settings, run_id) if run_id else RunLog.start(settings, run_name="register")
    registration = register_version(
        settings,
        compiled=CompileResult.load(run_dir / "compile"),
        evaluation=Evaluation.load(run_dir / "evaluate"),
        dataset=ValidationSummary.load(run_dir / "validate"),
        run=run,
    )
    typer.echo(registration.model_dump_json(indent=2))


@app.command("list")
def list_versions() -> None:
    """Every version with its aliases, lab and field top-1, and the gate's decision."""
    settings = _registry()
    name = settings.registered_model_name
    versions = all_versions(name)
    if not versions:
        typer.echo(f"no versions of {name!r} in {settings.tracking_uri}")
        raise typer.Exit(1)
    for v in versions:
        metrics = mlflow.get_run(v.run_id).data.metrics
        scores = "  ".join(f"{k}={metrics[k]:.3f}" for k in ("lab_top1", "field_top1") if k in metrics)
        dataset = Path(v.tags.get("dataset_dir", "?")).name
        typer.echo(f"{name} v{v.version:<3} {','.join(v.aliases) or '-':<22} {scores}  dataset={dataset}  {gate_summary(v)}")


@app.command()
def promote(version: Annotated[str, typer.Argument(help="model version to make champion")]) -> None:
    """Set alias `champion` on a version (the same as in the MLflow UI)."""
    settings = _registry()
    with exit_on(MlflowException):  # a version that does not exist: one line, not a traceback
        promote_version(settings.registered_model_name, version)
    typer.echo(f"{settings.registered_model_name} v{version} is now champion")


@app.command()
def rollback() -> None:
    """Give `champion` back to the version that held it before the current one."""
    settings = _registry()
    with exit_on(LookupError, MlflowException):
        version = rollback_champion(settings.registered_model_name)
    typer.echo(f"{settings.registered_model_name} v{version} is champion again")


@app.command()
def logins() -> None:
    """Create a deployment's MLflow logins (basic-auth app), as its admin: passwords from
    MLFLOW_ADMIN_PASSWORD and MLFLOW_<USER>_PASSWORD (AIRFLOW, BENTO, REVIEWER), the server
    from MLFLOW_TRACKING_URI. Compose's and Kubernetes' init jobs run it; harmless again."""
    import os

    from registry.logins import PROMOTERS, USERS, LoginsError, create_logins

    names = ["MLFLOW_TRACKING_URI", "MLFLOW_ADMIN_PASSWORD", *(f"MLFLOW_{user.upper()}_PASSWORD" for user in USERS)]
    if missing := [name for name in names if not os.environ.get(name)]:
        raise typer.BadParameter(f"set {', '.join(missing)}")
    passwords = {user: os.environ[f"MLFLOW_{user.upper()}_PASSWORD"] for user in USERS}
    with exit_on(LoginsError):
        create_logins(
            os.environ["MLFLOW_TRACKING_URI"],
            os.environ["MLFLOW_ADMIN_PASSWORD"],
            passwords,
            get_settings().experiment_name,
            get_settings().registered_model_name,
        )
    typer.echo(f"MLflow logins: {', '.join(USERS)}; may promote: {', '.join(PROMOTERS)}")


@signing_key.command("create")
def create_signing_key() -> None:
    """Create the signing key (an existing one is kept) and trust its public key. Run it where
    the training tasks run; give the trusted-keys file to every service that loads models."""
    settings = get_settings()
    key = signing.create_key(settings.signing_key_file, settings.trusted_keys_file)
    typer.echo(f"signing key {key}: {settings.signing_key_file} (private), trusted keys in {settings.trusted_keys_file}")


@signing_key.command("rotate")
def rotate_signing_key() -> None:
    """Replace the signing key: every version a trusted key signed is signed again with the new
    one, then only the new key is trusted (run again after a crash: it starts over)."""
    settings = _registry()
    with exit_on(signing.UntrustedModelError):
        new = signing.replace_key(settings.signing_key_file, settings.trusted_keys_file)
        resigned = resign_versions(settings)
        signing.trust_only(settings.signing_key_file, settings.trusted_keys_file)
    typer.echo(f"signing key {new}; signed again: {', '.join(f'v{v}' for v in resigned) or 'no version'}")
    typer.echo(f"copy {settings.trusted_keys_file} to every service that loads models; only this key is trusted now")


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
