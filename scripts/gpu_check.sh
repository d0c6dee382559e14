#!/usr/bin/env bash
# The GPU check in one command: the locked environment (installed when missing), then
# `python -m benchmarks.gpu` with the arguments given, which writes benchmarks/GPU_REPORT.md.
# On a GPU it trains, prunes, tunes, checks, times and serves coca_base; without one it is a dry
# run of every step that needs no GPU. `scripts/gpu_check.sh --help` lists the options.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/python ]] || make .venv/.synced
exec .venv/bin/python -m benchmarks.gpu "$@"
