#!/usr/bin/env bash
# Run once by the postgres image on an empty volume (/docker-entrypoint-initdb.d): one role and
# one database per service, as `make up` does for its local cluster (stack/__init__.py). psql
# reads each password from its own environment (\getenv, psql 15+): never a command-line argument.
set -euo pipefail
for pair in airflow:AIRFLOW_DB_PASSWORD mlflow:MLFLOW_DB_PASSWORD insect:FEEDBACK_DB_PASSWORD; do
    psql -v ON_ERROR_STOP=1 -v database="${pair%%:*}" -v password_var="${pair#*:}" --username "$POSTGRES_USER" <<'SQL'
\getenv password :password_var
CREATE ROLE :"database" LOGIN PASSWORD :'password';
CREATE DATABASE :"database" OWNER :"database";
SQL
done
