#!/usr/bin/env bash
# The whole loop on embedded defaults (SQLite MLflow, a PostgreSQL cluster under data/, local
# feedback images): retrain -> serve the champion -> users send photos and corrections ->
# ingest them into a new dataset version -> retrain on it. Called by `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
eval "$(python -m config airflow-env)"
logs=$(python -c "from config import get_settings; print(get_settings().data_dir / 'logs')")
port=$(python -c "from config import get_settings; print(get_settings().serve.port)")
mkdir -p "$logs"
start=$(date +%s)
bento_pid=""

step() { printf '\n=== %s  (%ss)\n' "$1" "$(( $(date +%s) - start ))"; }
# Run a step with its output in a log file; on failure show the log's end.
logged() {
    local log="$logs/$1.log"; shift
    if ! "$@" >"$log" 2>&1; then tail -n 60 "$log"; echo "failed: $* (full log: $log)"; return 1; fi
    echo "ok (log: $log)"
}
cleanup() {
    [[ -n "$bento_pid" ]] && kill "$bento_pid" 2>/dev/null && wait "$bento_pid" 2>/dev/null || true
    python -m feedback down || true
}
trap cleanup EXIT

step "1/7 retrain on the base dataset (airflow dags test retrain)"
logged airflow-db airflow db migrate
base=$(python -c "from config import get_settings; print(get_settings().base_dataset_dir)")
logged retrain-1 airflow dags test retrain -c "{\"dataset_dir\": \"$base\"}"   # the base, whatever an earlier demo published
python -m registry list

step "2/7 serve the champion (bentoml serve, 127.0.0.1:$port)"
python -m feedback up
key_file=$(python -c "from config import get_settings; print(get_settings().data_dir / 'keys' / 'demo-labeler.key')")
python -m feedback keys create --name demo-labeler --role labeler --out "$key_file"
bentoml serve bentos.service:InsectClassifier --port "$port" >"$logs/bento.log" 2>&1 &
bento_pid=$!
for _ in $(seq 180); do
    curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
    kill -0 "$bento_pid" 2>/dev/null || { tail -n 40 "$logs/bento.log"; exit 1; }
    sleep 1
done
curl -sf "http://127.0.0.1:$port/readyz" >/dev/null

step "3/7 users photograph insects in the field, send the photos and correct the answers"
python scripts/feedback_round.py --url "http://127.0.0.1:$port" --key-file "$key_file"

step "4/7 does the platform notice? (airflow dags test drift_watch)"
logged drift airflow dags test drift_watch
python -m feedback drift

step "5/7 ingest the feedback into a new dataset version (airflow dags test ingest_feedback)"
logged ingest airflow dags test ingest_feedback
python -m feedback exports

step "6/7 retrain on the new dataset version, from the champion's weights"
logged retrain-2 airflow dags test retrain

step "7/7 the trail: feedback -> dataset version -> model version"
python -m feedback exports
python -m registry summary
echo "demo wall time: $(( $(date +%s) - start )) s"
echo "web app: \`bentoml serve bentos.service:InsectClassifier\` (or \`make up\`), then open http://127.0.0.1:$port/app/"
echo "         and sign in with the labeler key in $key_file"
