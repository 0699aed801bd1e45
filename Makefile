# cm-arr: two stages meet through an HDF5 feature store.
#   make test                      install into .venv (first time; the tested pins of constraints.txt) and run the tests
#   make lint                      style and import order (ruff; CI runs it before the tests)
#   make demo                      the whole pipeline on an embedded corpus (see README)
#   make extract DATASET=iemocap IEMOCAP_DIR=/data/IEMOCAP_full_release [OUT=feats.h5]
#   make train FEATURES=feats.h5 [CONFIG=...] [VARIANT=cm-arr] [FOLDS=1,2] [OUT=runs/x]
#   make bench                     the benchmark tables

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint demo extract train bench

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/store.py
	$(PY) benchmarks/extract_speech_text.py
	$(PY) benchmarks/extract_video.py --frames 64
	$(PY) benchmarks/train.py
	$(PY) benchmarks/model_step.py

# the whole pipeline on an embedded corpus (about 60 s on 2 cores); DEMO_ARGS="--seed 1", "--quick", "--audio synth"
demo: $(STAMP)
	$(PY) -m cmarr.pipelines.demo --out demo_out $(DEMO_ARGS)

# make train FEATURES=feats.h5 [CONFIG=iemocap] [VARIANT=cm-arr] [FOLDS=1,2] [OUT=runs/x]
train: $(STAMP)
	@test -n "$(FEATURES)" || { echo "usage: make train FEATURES=feats.h5 [CONFIG=...] [VARIANT=...] [FOLDS=...] [OUT=...]" >&2; exit 2; }
	$(VENV)/bin/cm-arr-train --features $(FEATURES) $(if $(CONFIG),--config $(CONFIG)) $(if $(VARIANT),--variant $(VARIANT)) $(if $(FOLDS),--folds $(FOLDS)) --out $(or $(OUT),runs/$(or $(VARIANT),cm-arr))

# make extract DATASET=iemocap IEMOCAP_DIR=/data/IEMOCAP_full_release [OUT=features/iemocap.h5] \
#      [DENSEFACE=denseface.pt] [MODALITIES=speech,text,video] [EXTRACT_ARGS="--device cuda"]
# (DATASET=msp-improv with MSP_IMPROV_DIR=...). Running it again resumes.
DATASET ?= iemocap
STORE = $(or $(OUT),features/$(DATASET).h5)
MANIFEST ?= $(basename $(STORE)).manifest.csv
MODALITIES ?= speech,text,video
DENSEFACE ?=
EXTRACT_ARGS ?=

extract: $(STAMP)
	@case "$(DATASET)" in \
	  iemocap) root="$(IEMOCAP_DIR)"; var=IEMOCAP_DIR ;; \
	  msp-improv) root="$(MSP_IMPROV_DIR)"; var=MSP_IMPROV_DIR ;; \
	  *) echo "error: DATASET must be iemocap or msp-improv" >&2; exit 2 ;; \
	esac; \
	if [ -z "$$root" ]; then echo "error: set $$var=/path/to/the/corpus" >&2; exit 2; fi; \
	mkdir -p "$(dir $(STORE))" && \
	$(VENV)/bin/cm-arr-extract manifest $(DATASET) --root "$$root" --out "$(MANIFEST)" && \
	$(VENV)/bin/cm-arr-extract features $(DATASET) --root "$$root" --manifest "$(MANIFEST)" --out "$(STORE)" \
	  --modalities $(MODALITIES) $(if $(DENSEFACE),--denseface-checkpoint $(DENSEFACE)) $(EXTRACT_ARGS)
