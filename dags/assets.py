"""The Airflow Assets the DAGs exchange."""

from airflow.sdk import Asset

# A new dataset version: the ingest DAG publishes it, the retrain DAG is scheduled on it.
TRAINING_DATASET = Asset("insect_training_dataset")
