"""Writing files that may hold secrets: passwords, keys, connection strings."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, a file that may hold secrets: readable by its owner only, and
    replaced atomically, so a crash leaves the old file whole rather than half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file 0600 under a fresh name: never readable by others, not even while written
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())  # on disk before the rename makes it the file
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
