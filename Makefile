# The README names these targets. `make test` and `make demo` work on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-fast test-cluster lint demo train-tiny clean db-init screenshot screenshot-cluster bench

setup:
	bash scripts/setup.sh

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not msrun and not e2e and not cluster"

# The live CeleryExecutor tier alone (Redis, PostgreSQL, scheduler, two ascend workers; about 10 minutes).
test-cluster: setup
	$(PY) -m pytest -m cluster

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(PY) -m demo $(DEMO_ARGS)

train-tiny: setup
	$(PY) tools/train_tiny_qwen2vl.py --out tiny_models/qwen2vl
	$(PY) tools/train_tiny_qwen3vl.py --out tiny_models/qwen3vl --warm_start tiny_models/qwen2vl
	$(PY) tools/train_tiny_pllava.py --out tiny_models/pllava --lora_out tiny_models/pllava-lora

clean:
	rm -rf .pytest_cache build *.egg-info

db-init: setup
	@test -n "$(DB_URI)" || { echo "usage: make db-init DB_URI=postgresql://user:pass@host:5432/db"; exit 2; }
	$(PY) plugins/curation/metadb.py "$(DB_URI)"

# Regenerates the README's gallery picture with the demo itself.
screenshot: setup
	$(PY) -m demo --screenshot docs/gallery.png

# Regenerates the README's grid-view pictures (partition keys, both ascend hosts) on the local Celery cluster.
screenshot-cluster: setup
	$(PY) -m demo --cluster --out demo_output/cluster --grid-screenshot docs/cluster_grid.png

bench: setup
	$(PY) -m benchmarks.run $(BENCH_ARGS)
