# exaconnect: `make demo` and `make test` do all the set-up on a fresh machine.
# Stage targets enqueue a batch on QUEUES/SERVICE (`make workers SERVICE=...` drains it, here or on
# many nodes); `make run`, `make segment` and `make align` go through the stage runner, which
# enqueues each stage when what it needs is complete and drains it with N local workers.

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
PIPELINE    ?= configs/demo.yaml
LAYER       ?= $(DATA)/demo/image
SEGMENTATION ?= $(DATA)/demo/segmentation
SRC         ?= $(DATA)/demo/sample_96x96x96_seed0_image.npy
DEST        ?= $(DATA)/ingested
TYPE        ?= image
RESOLUTION  ?= 10,10,10
CHUNK_SIZE  ?= 64,64,64
MIPS        ?= 2
PORT        ?= 8765
EXIT_WHEN_EMPTY ?= 1
PYTEST_ARGS ?=
SEGMENTED   ?= $(DATA)/segmentation
MODEL       ?= ../shared/models/ffn-fib25/model.ckpt-27465036
SUBVOLUME   ?= 256,256,256
OVERLAP     ?= 32,32,32

.PHONY: help setup demo run test test-quick browser align train sweep sweep-summary ingest downsample mesh mesh-merge skeleton skeleton-merge segment \
        workers status view link bench clean image apptainer

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# The cpu image's lock first (what the image ships, so the tests run on it), then the project with
# its test tools, constrained to the same pins.
$(VENV)/.installed: pyproject.toml deploy/lock/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -r deploy/lock/cpu.txt
	$(PY) -m pip install -q -c deploy/lock/cpu.txt -e '.[cpu,test]'
	touch $@

setup: $(VENV)/.installed ## create .venv and install exaconnect

demo: setup ## the whole pipeline (configs/demo.yaml) on the built-in sample; prints its figures and a link
	$(EXA) run configs/demo.yaml --workers $(N)

run: setup ## run (or resume) the pipeline file PIPELINE with N local workers
	$(EXA) run $(PIPELINE) --workers $(N)

browser: ## headless Chromium + driver for the viewer tests (Debian packages)
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "chromium/chromedriver missing: browser tests will be skipped (install Debian packages chromium chromium-driver)"; fi; \
	fi

test: setup browser ## install everything and run the test suite
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-quick: setup ## the fast subset (kernels, configs, registry, CLI parsing): a few minutes
	$(PY) -m pytest -q -m quick $(PYTEST_ARGS)

ingest: setup ## enqueue ingest of SRC into DEST on QUEUES/ingest (TYPE=image|segmentation RESOLUTION=x,y,z)
	$(EXA) ingest enqueue $(SRC) $(DEST) --type $(TYPE) --resolution $(RESOLUTION) --chunk-size $(CHUNK_SIZE) --queue $(QUEUES)

downsample: setup ## enqueue an image pyramid of LAYER (MIPS levels) on QUEUES/downsample
	$(EXA) downsample enqueue $(LAYER) --num-mips $(MIPS) --queue $(QUEUES)

mesh: setup ## enqueue mesh fragments of SEGMENTATION (then make workers SERVICE=mesh, then make mesh-merge)
	$(EXA) mesh enqueue $(SEGMENTATION) --stage forge --queue $(QUEUES)

mesh-merge: setup ## enqueue mesh manifests of SEGMENTATION
	$(EXA) mesh enqueue $(SEGMENTATION) --stage merge --queue $(QUEUES)

skeleton: setup ## enqueue kimimaro skeleton fragments of SEGMENTATION on QUEUES/skeleton
	$(EXA) skeleton enqueue $(SEGMENTATION) --stage forge --queue $(QUEUES)

skeleton-merge: setup ## enqueue the skeleton fragment merge of SEGMENTATION
	$(EXA) skeleton enqueue $(SEGMENTATION) --stage merge --queue $(QUEUES)

segment: setup ## FFN-segment LAYER into SEGMENTED (MODEL, SUBVOLUME, OVERLAP) through the runner: passes, stitching, pyramid
	$(EXA) segment run $(LAYER) $(SEGMENTED) --model $(MODEL) --subvolume $(SUBVOLUME) --overlap $(OVERLAP) --num-mips $(MIPS) --queue $(QUEUES) --workers $(N)

ALIGN_SRC  ?= $(DATA)/demo/misaligned
ALIGN_DEST ?= $(DATA)/demo/realigned
align: setup ## align ALIGN_SRC into ALIGN_DEST through the runner (flow, mesh, compose, render, report PNG)
	$(EXA) align run $(ALIGN_SRC) $(ALIGN_DEST) --queue $(QUEUES) --workers $(N)

TRAIN_CONFIG ?= configs/train_synthetic.yaml
SWEEP        ?= configs/sweep_synthetic.yaml

train: setup ## train an FFN (exaconnect train run --config TRAIN_CONFIG)
	$(EXA) train run --config $(TRAIN_CONFIG)

sweep: setup ## enqueue one FFN training task per grid point of SWEEP on QUEUES/train (then: make workers SERVICE=train LEASE=3600)
	$(EXA) train sweep enqueue $(SWEEP) --queue $(QUEUES)

sweep-summary: setup ## rank finished sweep runs: summary.md, summary.json, sweep.png
	$(EXA) train sweep summary $(SWEEP)

workers: setup ## run N workers on QUEUE (default QUEUES/SERVICE); EXIT_WHEN_EMPTY=0 keeps them polling
	$(EXA) queue work $(QUEUE) --processes $(N) --lease-seconds $(LEASE) $(if $(filter 1,$(EXIT_WHEN_EMPTY)),--exit-when-empty,)

status: setup ## progress of QUEUE (default QUEUES/SERVICE)
	$(EXA) queue status $(QUEUE) --watch

DEMO_LAYERS ?= $(wildcard $(DATA)/demo/image $(DATA)/demo/image/tile_outlines $(DATA)/demo/aligned $(DATA)/demo/segmentation $(DATA)/demo/aligned_groundtruth)
view: setup ## serve the demo's layers (or LAYER and SEGMENTATION) with the bundled neuroglancer on 127.0.0.1:PORT
	$(EXA) view $(or $(DEMO_LAYERS),$(LAYER) $(SEGMENTATION)) --port $(PORT)

link: setup ## print a shareable neuroglancer link for LAYER and SEGMENTATION
	$(EXA) link $(LAYER) $(SEGMENTATION)

bench: setup ## run every benchmark (each prints one JSON line)
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

FLAVOUR ?= cpu
VERSION ?= 0.1.0
image: ## build the worker image with Docker (FLAVOUR=cpu|nvidia|xpu)
	docker build --build-arg FLAVOUR=$(FLAVOUR) -t exaconnect:$(VERSION)-$(FLAVOUR) .

apptainer: ## build exaconnect-FLAVOUR.sif with Apptainer from deploy/exaconnect.def (no Docker needed; on Aurora a compute node)
	apptainer build --fakeroot --build-arg FLAVOUR=$(FLAVOUR) $(if $(filter xpu,$(FLAVOUR)),,--build-arg BASE=python:3.11-slim-bookworm) exaconnect-$(FLAVOUR).sif deploy/exaconnect.def

clean: ## remove generated data and queues (not .venv)
	rm -rf $(DATA) $(QUEUES) artifacts

# The demo through the PBS scripts on this machine (deploy/box/pbs_demo.py): deploy/aurora/pipeline.pbs
# under a simulated 2-node job, the ranks' table, a voxel-for-voxel comparison with `make demo`'s
# output (resumed or made first), then a walltime that expires mid-segmentation and a resubmission.
.PHONY: cluster-demo
cluster-demo: setup ## the demo through deploy/aurora/pipeline.pbs on 2 simulated PBS nodes (and a walltime), compared with make demo's
	$(PY) deploy/box/pbs_demo.py --pipeline configs/demo.yaml --reference-output $(DATA)/demo --reference-queues queues/demo \
	  --local-workers $(N) --work $(DATA)/cluster-demo --walltime-case
