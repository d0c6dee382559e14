#!/usr/bin/env bash
# Run once by the postgres image on an empty volume (/docker-entrypoint-initdb.d): one role and
# one database per service, as `make up` does for its local cluster (stack/__init__.py).
set -euo pipefail
for pair in airflow:AIRFLOW_DB_PASSWORD mlflow:MLFLOW_DB_PASSWORD insect:FEEDBACK_DB_PASSWORD; do
    database="${pair%%:*}" password_var="${pair#*:}"
    psql -v ON_ERROR_STOP=1 -v password="${!password_var}" --username "$POSTGRES_USER" <<SQL
CREATE ROLE $database LOGIN PASSWORD :'password';
CREATE DATABASE $database OWNER $database;
SQL
done
