# Two commands on a fresh machine: `make demo` (the whole loop) and `make test`.
# Everything else (uv, the locked environment, Airflow's database) is set up on the way.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
UV ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast data lint clean up down status

$(UV):
	python3 -m pip install --user --quiet uv || curl -LsSf https://astral.sh/uv/install.sh | sh

# The environment is rebuilt when the lock changes. DeepSpeed's CPU comm op is JIT-built here once
# (about 100 s) instead of inside the first training run.
$(VENV)/.synced: uv.lock pyproject.toml | $(UV)
	$(UV) sync --frozen
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()"
	touch $@

data: $(VENV)/.synced
	$(PY) -m ml.data generate

demo: $(VENV)/.synced data
	scripts/demo.sh

# The platform as local services (PostgreSQL, S3, MLflow server, Airflow, the Bento): see README.
up: $(VENV)/.synced data
	$(PY) -m stack up

down: $(VENV)/.synced
	$(PY) -m stack down

status: $(VENV)/.synced
	$(PY) -m stack status

test: $(VENV)/.synced
	$(VENV)/bin/pytest

test-fast: $(VENV)/.synced
	$(VENV)/bin/pytest -m "not slow"

lint: $(VENV)/.synced
	$(VENV)/bin/ruff check .

clean:
	rm -rf data
