#!/bin/sh
# MinIO's buckets, and the application's own user, allowed those buckets and nothing else
# (insect-buckets.json): the services get this user's keys, never the root ones. Run again, it
# sets the user's secret again (how a rotated AWS_SECRET_ACCESS_KEY takes effect). mc finds the
# root login in MC_HOST_local and reads the user's secret on stdin: no secret in a command line.
set -eu
mc mb --ignore-existing local/mlflow local/feedback
mc admin policy create local insect-buckets /etc/minio/insect-buckets.json
printf '%s\n' "$AWS_SECRET_ACCESS_KEY" | mc admin user add local "$AWS_ACCESS_KEY_ID"
mc admin policy attach local insect-buckets --user "$AWS_ACCESS_KEY_ID" 2>/dev/null \
    || mc admin user info local "$AWS_ACCESS_KEY_ID" | grep -q insect-buckets  # attached by an earlier run
