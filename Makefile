# cm-arr: two stages meet through an HDF5 feature store.
#   make test                      install into .venv (first time) and run the test suite
#   make demo                      the whole pipeline on an embedded corpus (see README)
#   make extract DATASET=iemocap IEMOCAP_DIR=/data/IEMOCAP_full_release [OUT=feats.h5]
#   make train FEATURES=feats.h5 [RUN=runs/cm-arr]
#   make bench                     the benchmark tables

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1

.PHONY: install test bench

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) benchmarks/store.py
