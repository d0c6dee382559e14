#!/bin/sh
# MinIO's buckets, and one user per service, each allowed only what that service does by its own
# policy (insect-<service>.json beside this script): MLflow's server the mlflow bucket (clients
# reach artifacts through it, with their MLflow login), the Bento the photos it stores, Airflow's
# tasks reading them. The services get their user's keys, never the root ones. Run again, it
# sets each policy and secret again (how a rotated S3_*_SECRET_KEY takes effect). mc finds the
# root login in MC_HOST_local and reads each secret on stdin: no secret in a command line.
# ListBucket on feedback: HeadBucket (the Bento's readiness probe, the tasks' bucket check) needs
# it, and a missing photo is then a 404, not a 403.
set -eu
here=$(dirname "$0")
mc mb --ignore-existing local/mlflow local/feedback

# user NAME SECRET: the user NAME with the policy NAME (NAME.json); printf is a shell builtin
user() {
    mc admin policy create local "$1" "$here/$1.json"
    printf '%s\n' "$2" | mc admin user add local "$1"
    mc admin policy attach local "$1" --user "$1" 2>/dev/null \
        || mc admin user info local "$1" | grep -q "PolicyName: .*$1"  # attached by an earlier run
}
user insect-mlflow "$S3_MLFLOW_SECRET_KEY"
user insect-bento "$S3_BENTO_SECRET_KEY"
user insect-airflow "$S3_AIRFLOW_SECRET_KEY"
