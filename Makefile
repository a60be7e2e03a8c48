# Facial emotion recognition service: environment, archives, serving, tests.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL_STORE := model_store
SERVE_TIMEOUT ?= 180
MGMT := http://127.0.0.1:8081

.PHONY: install archives serve stop test grpc-stubs bench bench-quick clean

install: $(STAMP)

# Runs only when the venv is missing or pyproject.toml changed.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install torchserve==0.12.0 torch-model-archiver==0.12.0 pillow numpy av \
		pyyaml tqdm tensorboard matplotlib psutil requests grpcio grpcio-tools \
		googleapis-common-protos pytest captum
	$(PY) -m pip install -e '.[test]'
	$(PY) -m pip install --no-deps facenet-pytorch==2.6.0
	touch $@

$(MODEL_STORE)/emotion_image.mar: $(STAMP) pretrain/emotion_image.pth $(wildcard handlers/*.py export/*.py)
	$(PY) -m export --task image --checkpoint pretrain/emotion_image.pth --out $(MODEL_STORE)

$(MODEL_STORE)/emotion_video.mar: $(STAMP) pretrain/emotion_video.pth $(wildcard handlers/*.py export/*.py)
	$(PY) -m export --task video --checkpoint pretrain/emotion_video.pth --out $(MODEL_STORE)

# The video archive is built only when its weights exist.
ARCHIVES := $(MODEL_STORE)/emotion_image.mar $(if $(wildcard pretrain/emotion_video.pth),$(MODEL_STORE)/emotion_video.mar)
MODELS := $(patsubst $(MODEL_STORE)/%,%,$(ARCHIVES))

archives: $(ARCHIVES)

pretrain/%.pth:
	@echo "ERROR: $@ is missing: train it (python -m training.run) or restore the shipped weights" >&2; exit 1

# Start TorchServe in the background (token authorization on; keys in ./key_file.json) and
# wait until every model has a READY worker; on failure print the log and stop the server.
# config.properties names metrics.yaml relative to the repository: TorchServe's workers do not
# run from here, so the server gets a copy (build/config.properties) with that path made absolute.
serve: install archives
	mkdir -p build
	sed -e 's|^metrics_config=\([^/].*\)$$|metrics_config=$(CURDIR)/\1|' \
		-e 's|-Dlog4j.configurationFile=\([^/ ][^ ]*\)|-Dlog4j.configurationFile=file://$(CURDIR)/\1|' \
		config.properties > build/config.properties
	$(PY) -m ts.model_server --start --ncs --model-store $(MODEL_STORE) \
		--ts-config build/config.properties --models $(MODELS) > torchserve.out 2>&1 < /dev/null
	deadline=$$((SECONDS + $(SERVE_TIMEOUT))); \
	for m in $(basename $(MODELS)); do \
		until key=$$($(PY) -c 'import json;print(json.load(open("key_file.json"))["management"]["key"])' 2>/dev/null) \
			&& curl -sf -H "Authorization: Bearer $$key" $(MGMT)/models/$$m | grep -q '"status": "READY"'; do \
			if (( SECONDS > deadline )); then \
				echo "ERROR: model $$m not READY within $(SERVE_TIMEOUT)s; stopping TorchServe" >&2; \
				tail -n 40 logs/ts_log.log logs/model_log.log torchserve.out >&2 || true; \
				$(MAKE) --no-print-directory stop; exit 1; \
			fi; sleep 1; \
		done; echo "$$m READY"; \
	done
	@echo "TorchServe is up: inference http://127.0.0.1:8080, gRPC 127.0.0.1:7070; keys in key_file.json"

# Stop the server and wait for its process to exit (the pid file is machine-wide).
stop:
	pid=$$(cat /tmp/.model_server.pid 2>/dev/null || true); \
	$(PY) -m ts.model_server --stop; \
	if [ -n "$$pid" ]; then \
		for i in $$(seq 60); do kill -0 "$$pid" 2>/dev/null || exit 0; sleep 1; done; \
		echo "ERROR: TorchServe (pid $$pid) still running after 60s" >&2; exit 1; \
	fi

test: install
	$(PY) -m pytest -q tests

# Served throughput/latency vs the in-process limit and TorchServe's stock image_classifier
# handler (bench/serve_bench.py; < 10 minutes; results in bench/results/). Starts its own
# TorchServe (run `make stop` first if one is up). ARGS=--quick for a smoke run.
bench: install
	$(PY) bench/serve_bench.py $(ARGS)

bench-quick: install
	$(PY) bench/serve_bench.py --quick $(ARGS)

grpc-stubs: install
	$(PY) -c 'from tests.grpc_client import generate_stubs; print(generate_stubs())'

clean:
	rm -rf build logs $(MODEL_STORE)/*.mar torchserve.out
