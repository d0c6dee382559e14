"""Alembic environment: migrations run online against the URL set by `feedback.db.migrate`."""

from alembic import context
from sqlalchemy import create_engine

from feedback.db import metadata

url = context.config.get_main_option("sqlalchemy.url")
# a database that does not answer fails the migration in seconds instead of hanging a deploy
with create_engine(url, connect_args={"connect_timeout": 10}).connect() as connection:
    context.configure(connection=connection, target_metadata=metadata)
    with context.begin_transaction():
        context.run_migrations()
