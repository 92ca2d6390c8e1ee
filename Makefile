VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test soak lint typecheck clean bench

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/pixelmill serve

test: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy
	$(PY) -m pytest

# The reliability suite at ten times its scale: 20,000 images and 30 worker kills,
# 50 uploads of 200 rows, larger faulty requests (see docs/reliability.md). Figures
# of the run go to reliability-figures.json. Takes tens of minutes; not run in CI.
SOAK ?= 10
soak: $(STAMP)
	PIXELMILL_SOAK=$(SOAK) PIXELMILL_RELIABILITY_FIGURES=reliability-figures.json \
		$(PY) -m pytest tests/reliability -p no:cacheprovider -o timeout=3600

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# Throughput against img2dataset and the codec limit, the distributed mode against the
# embedded one (needs PostgreSQL on 127.0.0.1:5432), then the 1M-row ingest and output
# CSV; results in benchmarks/results/, read in docs/performance.md. Takes 30-45 minutes.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	NO_ALBUMENTATIONS_UPDATE=1 $(PY) benchmarks/throughput.py
	$(PY) benchmarks/distributed.py
	$(PY) benchmarks/ingest.py --rows 1000000 --repeat 3 --in-process
	$(PY) benchmarks/output_csv.py --rows 1000000

clean:
	rm -rf $(VENV) pixelmill-data .pytest_cache .mypy_cache
