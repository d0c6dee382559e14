"""The stack's secrets: generated on first start into a file only its owner can read, never committed."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

NAMES = (
    "airflow_db_password", "mlflow_db_password", "feedback_db_password",  # one PostgreSQL role each
    "airflow_admin_password", "airflow_jwt_secret", "airflow_api_secret_key",
    "s3_access_key", "s3_secret_key",
)


def load_or_create(path: Path) -> dict[str, str]:
    """The secrets in `path`, creating the file (mode 0600) with fresh random values the first
    time; a file written by an older version gains the names it lacks."""
    known = json.loads(path.read_text()) if path.exists() else {}
    missing = {name: secrets.token_urlsafe(24) for name in NAMES if name not in known}
    if missing:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".tmp")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(known | missing, out, indent=2)
        partial.replace(path)  # a crash mid-write leaves the old file, not half of a new one
    return known | missing
