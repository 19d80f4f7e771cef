# Every command of the README is a target here. `make test` and `make demo` set everything up.
VENV    ?= .venv
PY      := $(VENV)/bin/python
MSSAR   := $(VENV)/bin/mssar
# The torch build tested with mssar; override e.g. `make setup TORCH="torch torchvision"`.
TORCH   ?= torch==2.14.1 torchvision==0.29.1
FMNIST  := /usr/share/datasets/fashion-mnist

.PHONY: setup data demo test test-slow lint format fields bench count clean gpu-check

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Fashion-MNIST, the real data that is here: Debian's dataset-fashion-mnist package.
data:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then echo "Fashion-MNIST found in $(FMNIST)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	  echo "installed Fashion-MNIST into $(FMNIST)"; \
	else echo "Fashion-MNIST not found: run 'sudo apt-get install dataset-fashion-mnist' or put the four .gz files in data/fashion-mnist/"; fi

demo: setup data
	$(MSSAR) count --paper
	$(MSSAR) train recipes/quickstart.yaml
	$(MSSAR) show results/fashion_mnist/quickstart/seed0

count: setup
	$(MSSAR) count --paper

# Lint first (seconds), then the tests: CI (.ci/run) runs exactly this.
test: setup lint
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Regenerate docs/recipes.md's field reference from the schema (a test checks it is current).
fields: setup
	$(PY) -m mssar_cli.recipe_reference docs/recipes.md

test-slow: setup
	$(PY) -m pytest -q -m slow

# Appends to results/bench/*.csv and rewrites results/bench/*.md (about 20 minutes on a 2-core CPU).
bench: setup
	$(PY) -m benchmarks.module_step --markdown results/bench/module_step.md
	$(PY) -m benchmarks.pipeline --markdown results/bench/pipeline.md

clean:
	rm -rf $(VENV) .pytest_cache

# The check for the first machine with a CUDA GPU (no setup: such a machine may have no network).
gpu-check:
	bash benchmarks/gpu_check.sh
