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
# The feedback database's other logins (no database of their own): the Bento's and the key
# administrator's. `python -m feedback migrate`, run as its owner, grants them their rights.
for pair in insect_service:FEEDBACK_SERVICE_DB_PASSWORD insect_keys:FEEDBACK_KEYS_DB_PASSWORD; do
    psql -v ON_ERROR_STOP=1 -v role="${pair%%:*}" -v password_var="${pair#*:}" --username "$POSTGRES_USER" <<'SQL'
\getenv password :password_var
CREATE ROLE :"role" LOGIN PASSWORD :'password';
SQL
done
