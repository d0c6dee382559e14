"""What the project's command lines share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer


@contextmanager
def exit_on(*errors: type[Exception]) -> Iterator[None]:
    """An expected failure (bad input, a refused action) as its message on stderr and exit
    status 1, not a traceback."""
    try:
        yield
    except errors as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(1) from error
