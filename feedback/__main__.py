"""`python -m feedback`: the feedback database (embedded server up/down, `migrate` for a deploy),
what was exported, and the service's API keys (`keys create|list|revoke`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import sqlalchemy as sa
import typer

from config import get_settings
from config.cli import exit_on
from feedback import db, keys, postgres

app = typer.Typer(add_completion=False, help=__doc__)
keys_app = typer.Typer(add_completion=False, help="API keys for the service: create, list, revoke.")
app.add_typer(keys_app, name="keys")


def _engine() -> sa.Engine:
    """The feedback database the settings name, said on stderr; never starts the embedded one
    (`up` does), so a shell not pointed at the running stack says so instead of starting one."""
    with exit_on(LookupError):
        url = db.database_url(get_settings(), start=False)
    typer.echo(f"feedback database: {sa.make_url(url).render_as_string(hide_password=True)}", err=True)
    return db.engine_for(url)


@app.command()
def up() -> None:
    """Start the database (the embedded cluster unless a URL is configured) and migrate it."""
    url = db.migrate_once(db.database_url(get_settings()))  # the embedded one is migrated once, as it starts
    typer.echo(f"feedback database ready: {sa.make_url(url).render_as_string(hide_password=True)}")


@app.command()
def migrate() -> None:
    """Migrate the configured database (or the running embedded one) to the newest schema; starts
    nothing. A deploy runs this once (compose's init job, the Kubernetes Job, `make up`), never
    each service worker."""
    with exit_on(LookupError):
        url = db.database_url(get_settings(), start=False)
    shown = sa.make_url(url).render_as_string(hide_password=True)
    typer.echo(f"migrating feedback database: {shown}", err=True)
    with exit_on(sa.exc.OperationalError):  # down or refusing: exit 1, and a Job or init container retries
        db.migrate(url)
    typer.echo(f"feedback database migrated: {shown}")


@app.command()
def down() -> None:
    """Stop the embedded cluster (its data stays under the data directory)."""
    postgres.stop(get_settings().postgres_dir)


@app.command()
def exports() -> None:
    """Each dataset version built from feedback, with the feedback rows it consumed."""
    query = (
        sa.select(db.dataset_exports, sa.func.array_agg(db.feedback.c.id).label("feedback_ids"))
        .join(db.feedback, db.feedback.c.export_id == db.dataset_exports.c.id)
        .group_by(db.dataset_exports.c.id)
        .order_by(db.dataset_exports.c.id)
    )
    with _engine().connect() as conn:
        rows = list(conn.execute(query))
    if not rows:
        typer.echo("no dataset version has been built from feedback yet")
    for row in rows:
        ids = sorted(row.feedback_ids)
        shown = f"{ids}" if len(ids) <= 12 else f"[{', '.join(map(str, ids[:5]))}, ..., {', '.join(map(str, ids[-5:]))}]"
        typer.echo(
            f"export {row.id} at {row.created_at:%Y-%m-%d %H:%M} -> {row.dataset_dir}: "
            f"{row.num_samples} train samples from {len(ids)} feedback rows {shown}"
        )


@app.command()
def quarantined() -> None:
    """Feedback an ingest refused, with why (it never trains; correct it and send it again)."""
    rows = db.quarantined(_engine())
    if not rows:
        typer.echo("no feedback is quarantined")
    for row in rows:
        typer.echo(f"feedback {row.id} ({row.corrected_label!r}, from {row.submitted_by or '-'}): {row.quarantine_reason}")


@app.command()
def drift(top: Annotated[int, typer.Option(help="how many of the least familiar predictions to list")] = 5) -> None:
    """The newest drift watch's verdict and the predictions it found least like the training set."""
    from feedback.drift import latest_report

    settings = get_settings()
    report = latest_report(settings)
    if report is None:
        typer.echo("no drift watch has tested predictions yet: run `airflow dags test drift_watch`")
        raise typer.Exit(1)
    verdict = "DRIFT" if report.drifted else "no drift"
    typer.echo(
        f"{verdict}: champion v{report.model_version} on the newest {report.predictions} predictions vs "
        f"{report.reference} lab images: MMD² {report.mmd2:.4f}, p = {report.p_value:.4f} (alpha {settings.drift.alpha})"
    )
    for row in db.most_drifted(_engine(), top):
        typer.echo(f"  witness {row.witness:+.4f}  prediction {row.id}  {row.image_key}")


@keys_app.command("create")
def create_key(
    name: Annotated[str, typer.Option(help="who holds it (unique)")],
    role: Annotated[str, typer.Option(help=f"one of {', '.join(keys.ROLES)}")] = "client",
    out: Annotated[
        Path | None, typer.Option(help="keep the key in this file (mode 0600), never printed; a valid key there is kept")
    ] = None,
) -> None:
    """Create a key; it is shown once, alone on the last line (or only written to --out)."""
    engine = _engine()
    if out is not None:
        with exit_on(ValueError):
            keys.key_in_file(engine, out, name=name, role=role)
        typer.echo(f"key {name!r} ({role}) is in {out} (readable by its owner only)")
        return
    with exit_on(ValueError):
        key = keys.create_key(engine, name=name, role=role)
    typer.echo(f"key {name!r} ({role}); store it now, it is not shown again:")
    typer.echo(key)


@keys_app.command("list")
def list_keys() -> None:
    """Every key's name, role and state (the keys themselves are not stored)."""
    for row in keys.list_keys(_engine()):
        state = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "active"
        typer.echo(f"{row.name:<24} {row.role:<8} created {row.created_at:%Y-%m-%d %H:%M}  {state}")


@keys_app.command("revoke")
def revoke_key(name: Annotated[str, typer.Argument(help="the key's name")]) -> None:
    """Revoke a key: the service refuses it within seconds."""
    if not keys.revoke_key(_engine(), name):
        typer.echo(f"no active key named {name!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"key {name!r} revoked")


if __name__ == "__main__":
    app()
