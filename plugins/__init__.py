"""Airflow plugins folder (AIRFLOW__CORE__PLUGINS_FOLDER): custom operators and hooks."""
