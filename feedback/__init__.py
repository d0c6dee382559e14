"""User feedback: rows in PostgreSQL (`db`, schema by Alembic migrations), images in S3 or local
files (`images`), and its export into new dataset versions for retraining (`export`)."""
