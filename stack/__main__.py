"""`python -m stack up|down|status` (`make up`, `make down`, `make status`): the local service stack;
`python -m stack env-file`: its secrets as a .env for docker compose and Kubernetes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from config import REPO_ROOT, get_settings
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
        typer.secho(f"make up failed: {error}", fg="red", err=True)
        raise typer.Exit(1) from error
    typer.echo(f"\nall healthy in {time.monotonic() - started:.0f} s; logs in {stack.logs}\n")
    for line in stack.logins():
        typer.echo(line)


@app.command()
def down() -> None:
    """Stop every service (their data stays under the data directory)."""
    Stack(get_settings()).down()
    typer.echo("stopped")


@app.command()
def status() -> None:
    """Each service's state and health."""
    states = Stack(get_settings()).status()
    for name, state in states.items():
        typer.echo(f"{name:<22} {state}")
    if any("healthy" not in state for state in states.values()):
        raise typer.Exit(3)  # like `systemctl status`: not everything is up


@app.command("env-file")
def env_file(path: Annotated[Path, typer.Argument(help="where to write it")] = REPO_ROOT / ".env") -> None:
    """Write the stack's secrets as a .env file for docker compose and Kubernetes (mode 0600)."""
    stack = Stack(get_settings())
    secrets.write_env_file(stack.secrets, path)
    typer.echo(f"wrote {path} from {stack.dir / 'secrets.json'}")


if __name__ == "__main__":
    app()
