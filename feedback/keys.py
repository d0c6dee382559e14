"""API keys: who may call the service, and in which role.

A key is shown once, when it is created; the database keeps only its sha256 (a key is 256
random bits, so a fast hash suffices: there is no password to guess) and the name and role it
was given. Roles are ordered: each may do what the ones before it may.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from config.private import write_private
from feedback.db import api_keys

ROLES = ("client", "labeler", "admin")  # predict and suggest; corrections that train; keys
KEY_PREFIX = "insect_"


@dataclass(frozen=True)
class Caller:
    """Whose key a request carried."""

    name: str
    role: str

    def may_act_as(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(db: sa.Engine, *, name: str, role: str) -> str:
    """A new key for `name` in `role`; the only time the key itself is seen."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    try:
        with db.begin() as conn:
            conn.execute(api_keys.insert().values(name=name, role=role, key_sha256=key_digest(key)))
    except sa.exc.IntegrityError as error:
        raise ValueError(f"an active key named {name!r} exists already; revoke it or choose another name") from error
    return key


def key_in_file(db: sa.Engine, path: Path, *, name: str, role: str) -> Path:
    """`path` holding a valid key named `name`: the one already there, or a new one (replacing
    an active key of that name), written readable by its owner only. The key is never printed."""
    if path.is_file() and caller_for(db, path.read_text().strip()) == Caller(name, role):
        return path
    revoke_key(db, name)
    write_private(path, create_key(db, name=name, role=role) + "\n")
    return path


def revoke_key(db: sa.Engine, name: str) -> bool:
    """Revoke the key named `name`; False when there is no such active key."""
    with db.begin() as conn:
        revoked = conn.execute(
            api_keys.update().where(api_keys.c.name == name, api_keys.c.revoked_at.is_(None)).values(revoked_at=sa.func.now())
        )
    return revoked.rowcount == 1


def list_keys(db: sa.Engine) -> list[sa.Row]:
    with db.connect() as conn:
        return list(conn.execute(sa.select(api_keys.c.name, api_keys.c.role, api_keys.c.created_at, api_keys.c.revoked_at)))


def caller_for(db: sa.Engine, key: str) -> Caller | None:
    """Who holds `key`, or None for an unknown or revoked one."""
    return caller_for_digest(db, key_digest(key))


def caller_for_digest(db: sa.Engine, digest: str) -> Caller | None:
    """Who holds the key with this sha256 (what a web session keeps instead of the key)."""
    with db.connect() as conn:
        row = conn.execute(
            sa.select(api_keys.c.name, api_keys.c.role, api_keys.c.key_sha256).where(
                api_keys.c.key_sha256 == digest, api_keys.c.revoked_at.is_(None)
            )
        ).first()
    if row is None or not hmac.compare_digest(row.key_sha256, digest):
        return None
    return Caller(row.name, row.role)
