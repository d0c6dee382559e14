"""The Airflow DAGs (`retrain`, `ingest_feedback`) and what their tasks share. The DAG files only
wire the stages of `ml/`, `registry/` and `feedback/` together."""
