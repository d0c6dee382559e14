"""`python -m stack up|down|status` (`make up`, `make down`, `make status`): the local service stack;
`python -m stack env`: shell exports that point a shell at it; `python -m stack env-file`: its
secrets as a .env for docker compose and Kubernetes."""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Annotated

import typer

from config import REPO_ROOT, get_settings
from feedback import postgres
from stack import Stack, StackError, secrets

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def up() -> None:
    """Start every service that is not running, each healthy before the next; print the URLs."""
    stack = Stack(get_settings())
    started = time.monotonic()
    try:
        stack.up(typer.echo)
    except StackError as error:
        running = stack.running_services()
        left = f"still running: {', '.join(running)} (`make down` stops them)" if running else "nothing left running"
        typer.secho(f"make up failed: {error}\n{left}", fg="red", err=True)
        raise typer.Exit(1) from error
    typer.echo(f"\nall healthy in {time.monotonic() - started:.0f} s; logs in {stack.logs}\n")
    for line in stack.logins():
        typer.echo(line)


@app.command()
def down() -> None:
    """Stop every service and any process it left (their data stays under the data directory)."""
    try:
        Stack(get_settings()).down()
    except StackError as error:
        typer.secho(str(error), fg="red", err=True)
        raise typer.Exit(1) from error
    typer.echo("stopped; no stack process left, every stack port free")


@app.command()
def status() -> None:
    """Each service's state and health."""
    states = Stack(get_settings()).status()
    for name, state in states.items():
        typer.echo(f"{name:<22} {state}")
    if any("healthy" not in state for state in states.values()):
        raise typer.Exit(3)  # like `systemctl status`: not everything is up


@app.command()
def env() -> None:
    """Shell exports that point this shell's commands (`python -m registry`, `python -m feedback`,
    mlflow, curl) at the running stack, as the person promoting models: `eval "$(python -m stack
    env)"`. The services' URLs, the API keys' folder, MLflow's `reviewer` login and the feedback
    database as its key administrator (API keys, and the exports to read); no S3 key (model files
    come through MLflow, with that login)."""
    stack = Stack(get_settings())
    typer.echo(f"# make up's stack under {stack.dir}")
    shell = {"BENTO_URL": stack.url("bento"), "STACK_KEYS": str(stack.keys)}  # for curl and the README's examples
    shell |= stack.mlflow_login("reviewer")  # a person's login: reads, and promotes
    # `python -m feedback keys` and `exports` (README's stack blocks): no row of the service's to write
    shell["INSECT_FEEDBACK__DATABASE_URL"] = stack.feedback_url(postgres.KEYS_ROLE)
    for key, value in (stack.addresses() | shell).items():
        typer.echo(f"export {key}={shlex.quote(value)}")


@app.command("env-file")
def env_file(
    path: Annotated[Path, typer.Argument(help="where to write it")] = REPO_ROOT / ".env",
    workload: Annotated[
        str | None, typer.Option(help=f"only this Kubernetes workload's secrets: {', '.join(secrets.WORKLOADS)}")
    ] = None,
) -> None:
    """Write the stack's secrets as a .env file for docker compose and Kubernetes (mode 0600)."""
    if workload is not None and workload not in secrets.WORKLOADS:
        raise typer.BadParameter(f"unknown workload {workload!r}; one of {', '.join(secrets.WORKLOADS)}")
    stack = Stack(get_settings())
    secrets.write_env_file(stack.secrets, path, secrets.WORKLOADS[workload] if workload else secrets.NAMES)
    typer.echo(f"wrote {path} from {stack.secrets_file}")


if __name__ == "__main__":
    app()
