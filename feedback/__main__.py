"""`python -m feedback`: the feedback database (embedded server up/down) and what was exported."""

from __future__ import annotations

import sqlalchemy as sa
import typer

from config import get_settings
from feedback import db, postgres

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def up() -> None:
    """Start the database (the embedded cluster unless a URL is configured) and migrate it."""
    settings = get_settings()
    db.engine(settings)
    url = sa.make_url(db.database_url(settings)).render_as_string(hide_password=True)
    typer.echo(f"feedback database ready: {url}")


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
    with db.engine(get_settings()).connect() as conn:
        rows = list(conn.execute(query))
    if not rows:
        typer.echo("no dataset version has been built from feedback yet")
    for row in rows:
        ids = sorted(row.feedback_ids)
        typer.echo(
            f"export {row.id} at {row.created_at:%Y-%m-%d %H:%M} -> {row.dataset_dir}: "
            f"{row.num_samples} train samples from feedback ids {ids}"
        )


if __name__ == "__main__":
    app()
