# mmstream: `make demo` and `make test` each do all of their own set-up.
SHELL := /bin/bash
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
IMAGE_SIZE ?= 64
# 64 (the default) in .cache/reference-{model,onnx}; other sizes beside it, e.g. -256.
MODEL_SUFFIX := $(if $(filter 64,$(IMAGE_SIZE)),,-$(IMAGE_SIZE))
MODEL_KERAS := .cache/reference-model$(MODEL_SUFFIX)/model.keras
MODEL_ONNX := .cache/reference-onnx$(MODEL_SUFFIX)
# make bench: two worker processes (one per core here) over four partitions.
BENCH_ARGS ?= --processes 2 --partitions 4

.PHONY: help install lint test test-fast demo bench soak model byom-models gpu-kit wheelhouse image-test kafka kafka-stop clean
help:
	@echo "make demo        train+export the reference model (cached), start Kafka, run the demo"
	@echo "make test        lint, type-check and run the full test suite (real Kafka broker)"
	@echo "make kafka       start the local broker on 127.0.0.1:9092; make kafka-stop stops it"
	@echo "make model       train and export the reference model only (IMAGE_SIZE=256 for the big one)"
	@echo "make byom-models the test suite's bring-your-own-model examples in .cache (docs/byom.md):"
	@echo "                 an ONNX graph (image crop, tokenizer, waveform) and a Keras WordPiece model"
	@echo "make bench       benchmark raw ORT, raw consume and the worker (writes .cache/bench)"
	@echo "                 e.g. make bench IMAGE_SIZE=256 BENCH_ARGS='--content raw --events 1500'"
	@echo "make soak        20 min per guarantee on a 3-broker cluster, a fault a minute (not in CI)"
	@echo "                 e.g. make soak SOAK_ARGS='--minutes 5 --guarantees exactly-once'"
	@echo "make gpu-kit     prepare the GPU bench's carried files in .cache/gpu (deploy/gpu/README.md)"
	@echo "make wheelhouse  the wheels an image build installs, for builds without an index"
	@echo "                 (IMAGE=cpu or gpu; .cache/wheelhouse-IMAGE; deploy/docker/README.md)"
	@echo "make image-test  build both images with buildah (no Docker) and run their workers against"
	@echo "                 a local broker: every event predicted, non-root, SIGTERM drains (exit 0)"

install: $(STAMP)
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[export,test,dev,bench,confluent]'
	touch $@

lint: install
	$(BIN)/ruff check worker export tests
	$(BIN)/ruff format --check worker export tests
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not integration"

$(MODEL_KERAS): | $(STAMP)
	$(BIN)/mmstream train-reference --out $(dir $@) --image-size $(IMAGE_SIZE)

$(MODEL_ONNX)/manifest.json: $(MODEL_KERAS)
	$(BIN)/mmstream export --model $< --out $(MODEL_ONNX)

model: $(MODEL_ONNX)/manifest.json

# The examples tests/test_byom.py serves, exported into .cache/byom-onnx and .cache/byom-keras
# (e.g. for `mmstream bench --model .cache/byom-onnx --content raw`).
byom-models: install
	$(BIN)/python tests/byom_models.py .cache

demo: model kafka
	$(BIN)/mmstream demo --model $(MODEL_ONNX) --bootstrap-servers 127.0.0.1:$(KAFKA_PORT)

bench: model kafka
	$(BIN)/mmstream bench --model $(MODEL_ONNX) --bootstrap-servers 127.0.0.1:$(KAFKA_PORT) $(BENCH_ARGS)

# Not part of `make test`: about 45 minutes (two guarantees); the report goes to .cache/soak.
soak: install
	$(BIN)/python tests/soak.py $(SOAK_ARGS)

# What deploy/gpu/bench-gpu.sh carries to the device machine (Python 3.12 there), which a
# fresh checkout lacks: both models, the small wheels, onnxruntime-gpu cut into parts of at
# most 61 MiB (.cache/gpu/whlparts), then the script's dry run. About 250 MB of downloads.
# Linux x86_64 wheels for another interpreter than this venv's: $(call wheels_for,3.12).
wheels_for = --only-binary=:all: --python-version $(1) --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
GPU_PLAT := $(call wheels_for,3.12)
pin = $(shell grep -h '^$(1)==' constraints.txt deploy/docker/constraints-gpu.txt)
gpu-kit: install
	$(MAKE) model
	$(MAKE) model IMAGE_SIZE=256
	rm -rf .cache/gpu/whl .cache/gpu/whlparts .cache/gpu-download
	$(BIN)/python -m pip download -q --no-deps $(GPU_PLAT) -d .cache/gpu/whl \
		$(call pin,kafka-python) $(call pin,crc32c)
	$(BIN)/python -m pip download -q --no-deps $(GPU_PLAT) -d .cache/gpu-download \
		$(call pin,onnxruntime-gpu)
	bash deploy/gpu/bench-gpu.sh --split-wheel .cache/gpu-download/onnxruntime_gpu-*.whl
	PYTHON=$(BIN)/python OUT=.cache/gpu-dry bash deploy/gpu/bench-gpu.sh --dry-run

# The wheels Dockerfile.$(IMAGE) installs (the same list and constraints as its build
# stage, for Linux x86_64 CPython 3.11), for `--build-arg WHEELHOUSE=.cache/wheelhouse-$(IMAGE)`.
IMAGE ?= cpu
IMAGE_EXTRAS ?= confluent
WHEELHOUSE := .cache/wheelhouse-$(IMAGE)
WHEEL_PLAT := $(call wheels_for,3.11)
wheelhouse: install
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	if [ "$(IMAGE)" = gpu ]; then \
		{ $(BIN)/python deploy/docker/requirements.py --extra gpu --without onnxruntime \
			--extra "$(IMAGE_EXTRAS)" && echo "onnxruntime-gpu[cuda,cudnn]"; }; \
	else $(BIN)/python deploy/docker/requirements.py --extra "$(IMAGE_EXTRAS)"; \
	fi > $(WHEELHOUSE)/requirements.txt
	$(BIN)/python -m pip download -q $(WHEEL_PLAT) -d $(WHEELHOUSE) -c constraints.txt \
		$(if $(filter gpu,$(IMAGE)),-c deploy/docker/constraints-gpu.txt) \
		-r $(WHEELHOUSE)/requirements.txt "setuptools>=77"
	@echo "$(WHEELHOUSE): $$(ls $(WHEELHOUSE)/*.whl | wc -l) wheels, $$(du -sh $(WHEELHOUSE) | cut -f1)"

# Installs buildah, podman and mmdebstrap with apt-get when they are missing (deploy/docker/README.md).
image-test: model
	$(MAKE) wheelhouse IMAGE=cpu
	$(MAKE) wheelhouse IMAGE=gpu
	$(BIN)/python deploy/docker/image_test.py

clean:
	rm -rf .cache/reference-model .cache/reference-onnx .pytest_cache .mypy_cache .ruff_cache

include deploy/local/kafka.mk
