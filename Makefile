# Two commands on a fresh machine: `make demo` (the whole loop) and `make test`.
# Everything else (uv, the locked environment, Airflow's database) is set up on the way.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
UV ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast data lint fmt clean up down status system-packages loadtest hostile gpu-check docs docs-build

$(UV):
	python3 -m pip install --user --quiet uv || curl -LsSf https://astral.sh/uv/install.sh | sh

# The environment is rebuilt when the lock changes. Its bytecode is compiled once here (about 40 s):
# without .pyc files (PYTHONDONTWRITEBYTECODE, read-only installs) every process that imports torch,
# Airflow and DeepSpeed compiles them again, 14-18 s against 7 s measured here. DeepSpeed's CPU
# comm op is JIT-built here once (about 100 s) instead of inside the first training run.
$(VENV)/.synced: uv.lock pyproject.toml | $(UV)
	$(UV) sync --frozen --compile-bytecode
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()"
	touch $@

data: $(VENV)/.synced
	$(PY) -m ml.data generate

demo: $(VENV)/.synced data system-packages
	scripts/demo.sh

# Debian's packages for what the project starts itself: PostgreSQL (its server programs may be
# off PATH, in /usr/lib/postgresql/<version>/bin, where the code finds them), Redis (rate limits,
# Celery's broker) and Chromium with its driver (the UI tests). Installed once, as root or via sudo.
SYSTEM_PACKAGES := postgresql redis-server chromium chromium-driver
system-packages:
	@{ command -v pg_ctl || ls /usr/lib/postgresql/*/bin/pg_ctl; } >/dev/null 2>&1 && command -v redis-server >/dev/null \
		&& command -v chromedriver >/dev/null || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES); }

# The platform as local services (PostgreSQL, S3, MLflow server, Airflow, the Bento): docs/services.md.
# `make up EXECUTOR=celery WORKERS=2` runs Airflow's tasks on Celery workers (Redis as broker).
up: $(VENV)/.synced data system-packages
	$(if $(EXECUTOR),INSECT_STACK__EXECUTOR=$(EXECUTOR)) $(if $(WORKERS),INSECT_STACK__WORKERS=$(WORKERS)) $(PY) -m stack up

down: $(VENV)/.synced
	$(PY) -m stack down

status: $(VENV)/.synced
	$(PY) -m stack status

# The Bento under load (locust at 1, 16 and 64 users; run `make demo` first): benchmarks/LOAD.md
loadtest: $(VENV)/.synced
	$(PY) -m benchmarks.load

# One good client beside made-up keys and slow uploads; a 200 MB form; made-up paths and /metrics
# (the champion, else a tiny model): benchmarks/HOSTILE.md, exits 1 on a failed criterion
hostile: $(VENV)/.synced
	$(PY) -m benchmarks.hostile

# The GPU path in one run: train, prune, tune, check and time on the GPU, serve one /predict;
# a dry run where there is no GPU. Writes benchmarks/GPU_REPORT.md (`make gpu-check ARGS=--help`)
gpu-check: $(VENV)/.synced
	scripts/gpu_check.sh $(ARGS)

# Lint and the docs first: a style or import error or a broken link fails in seconds, not after
# half an hour of tests.
test: lint docs-build system-packages
	$(VENV)/bin/pytest

test-fast: $(VENV)/.synced
	$(VENV)/bin/pytest -m "not slow"

lint: $(VENV)/.synced
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: $(VENV)/.synced
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The documentation site (docs/, mkdocs.yml): served on 127.0.0.1:8000, rebuilt as you edit;
# the strict build fails on a broken link, anchor or cross-reference (about 10 s).
docs: $(VENV)/.synced
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8000

docs-build: $(VENV)/.synced
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

clean:
	rm -rf data site
