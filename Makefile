# exaconnect: `make demo` and `make test` do all the set-up on a fresh machine.
# Stage targets enqueue a batch on a queue; `make workers` drains it (locally or on many nodes).

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
EXA         := $(VENV)/bin/exaconnect
DATA        ?= data
QUEUES      ?= queues
SERVICE     ?= ingest
QUEUE       ?= $(QUEUES)/$(SERVICE)
N           ?= 2
LEASE       ?= 600
LAYER       ?= $(DATA)/demo/image
SEGMENTATION ?= $(DATA)/demo/groundtruth
SRC         ?= $(DATA)/demo/sample_image.npy
DEST        ?= $(DATA)/ingested
TYPE        ?= image
RESOLUTION  ?= 10,10,10
CHUNK_SIZE  ?= 64,64,64
MIPS        ?= 2
PORT        ?= 8765
EXIT_WHEN_EMPTY ?= 1
PYTEST_ARGS ?=
SEGMENTED   ?= $(DATA)/segmentation
DEMO_FFN    ?= train
MODEL       ?= ../shared/models/ffn-fib25/model.ckpt-27465036
SUBVOLUME   ?= 256,256,256
OVERLAP     ?= 32,32,32
SEGMENT_STAGES := segment-faces segment-equivalence segment-relabel

.PHONY: help setup demo test browser align train sweep sweep-summary ingest downsample mesh mesh-merge skeletonize skeleton-merge segment \
        workers status view link bench clean image apptainer

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed ## create .venv and install exaconnect

demo: setup ## run the whole pipeline on the built-in sample and print a neuroglancer link
	$(EXA) demo --workers $(N) --ffn $(DEMO_FFN)

browser: ## headless Chromium + driver for the viewer tests (Debian packages)
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "chromium/chromedriver missing: browser tests will be skipped (install Debian packages chromium chromium-driver)"; fi; \
	fi

test: setup browser ## install everything and run the test suite
	$(PY) -m pytest -q $(PYTEST_ARGS)

ingest: setup ## enqueue ingest of SRC into DEST (TYPE=image|segmentation RESOLUTION=x,y,z)
	$(EXA) ingest $(SRC) $(DEST) --type $(TYPE) --resolution $(RESOLUTION) --chunk-size $(CHUNK_SIZE) --queue $(QUEUES)/ingest

downsample: setup ## enqueue an image pyramid of LAYER (MIPS levels)
	$(EXA) enqueue downsample $(LAYER) --num-mips $(MIPS) --queue $(QUEUES)/downsample

mesh: setup ## enqueue mesh fragments of SEGMENTATION (then make workers SERVICE=mesh, then make mesh-merge)
	$(EXA) enqueue mesh $(SEGMENTATION) --queue $(QUEUES)/mesh

mesh-merge: setup ## enqueue mesh manifests of SEGMENTATION
	$(EXA) enqueue mesh-merge $(SEGMENTATION) --queue $(QUEUES)/mesh

skeletonize: setup ## enqueue kimimaro skeleton fragments of SEGMENTATION
	$(EXA) enqueue skeletonize $(SEGMENTATION) --queue $(QUEUES)/skeletonize

skeleton-merge: setup ## enqueue the skeleton fragment merge of SEGMENTATION
	$(EXA) enqueue skeleton-merge $(SEGMENTATION) --queue $(QUEUES)/skeletonize

segment: setup ## FFN-segment LAYER into SEGMENTED (MODEL, SUBVOLUME, OVERLAP): passes, stitch, downsample, N local workers
	$(EXA) enqueue segment $(LAYER) $(SEGMENTED) --model $(MODEL) --subvolume $(SUBVOLUME) --overlap $(OVERLAP) --overwrite --queue $(QUEUES)/segment
	$(EXA) worker $(QUEUES)/segment --processes $(N) --lease-seconds $(LEASE) --exit-when-empty
	$(EXA) status $(QUEUES)/segment >/dev/null
	@for stage in $(SEGMENT_STAGES); do \
	  $(EXA) enqueue $$stage $(SEGMENTED) --queue $(QUEUES)/segment && \
	  $(EXA) worker $(QUEUES)/segment --processes $(N) --lease-seconds $(LEASE) --exit-when-empty && \
	  $(EXA) status $(QUEUES)/segment >/dev/null || exit 1; \
	done
	$(EXA) enqueue downsample $(SEGMENTED) --num-mips $(MIPS) --queue $(QUEUES)/segment
	$(EXA) worker $(QUEUES)/segment --processes $(N) --exit-when-empty

ALIGN_SRC  ?= $(DATA)/demo/misaligned
ALIGN_DEST ?= $(DATA)/demo/aligned
align: setup ## align ALIGN_SRC into ALIGN_DEST (flow, mesh, compose, render on queues/align) and write DEST/align/report.png
	$(EXA) align run $(ALIGN_SRC) $(ALIGN_DEST) --queue $(QUEUES)/align --workers $(N)

TRAIN_CONFIG ?= configs/train_synthetic.yaml
SWEEP        ?= configs/sweep_synthetic.yaml

train: setup ## train an FFN (exaconnect train --config TRAIN_CONFIG)
	$(EXA) train --config $(TRAIN_CONFIG)

sweep: setup ## enqueue one FFN training task per grid point of SWEEP (then: make workers SERVICE=train LEASE=3600)
	$(EXA) sweep enqueue $(SWEEP) --queue $(QUEUES)/train

sweep-summary: setup ## rank finished sweep runs: summary.md, summary.json, sweep.png
	$(EXA) sweep summary $(SWEEP)

workers: setup ## run N workers on QUEUE (default queues/SERVICE); EXIT_WHEN_EMPTY=0 keeps them polling
	$(EXA) worker $(QUEUE) --processes $(N) --lease-seconds $(LEASE) $(if $(filter 1,$(EXIT_WHEN_EMPTY)),--exit-when-empty,)

status: setup ## progress of QUEUE (default queues/SERVICE)
	$(EXA) status $(QUEUE) --watch

DEMO_SEGMENTATION ?= $(DATA)/demo/ffn_segmentation
view: setup ## serve LAYER, SEGMENTATION (and the demo's FFN segmentation) with the bundled neuroglancer on 127.0.0.1:PORT
	$(EXA) view $(LAYER) $(SEGMENTATION) $(wildcard $(DEMO_SEGMENTATION)) --port $(PORT)

link: setup ## print a shareable neuroglancer link for LAYER and SEGMENTATION
	$(EXA) link $(LAYER) $(SEGMENTATION)

bench: setup ## run every benchmark (each prints one JSON line)
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

image: ## build the worker container (Docker)
	docker build -t exaconnect:latest .

apptainer: ## build an Apptainer image from the Docker image (on Aurora login nodes)
	apptainer build exaconnect.sif docker-daemon://exaconnect:latest

clean: ## remove generated data and queues (not .venv)
	rm -rf $(DATA) $(QUEUES) artifacts
