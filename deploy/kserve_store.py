"""``python -m deploy.kserve_store``: the storage folder KServe's TorchServe runtime serves.

::

    deploy/kserve/store/
      config/config.properties         KServe, Open Inference Protocol (v2), CPU, both models:
                                       what KServe's TorchServe runtime reads by default
      config/emotion_image.properties  KServe v2, CPU, one model (deploy/kserve/emotion-image.yaml;
      config/emotion_video.properties  emotion-video.yaml)
      config/emotion_*-gpu.properties  the same with one worker on the pod's GPU
      config/rest.properties           no envelope (the project's /predictions API), CPU, both
                                       models (deploy/k8s/)
      config/rest-gpu.properties       the same with one worker per model per GPU
      config/metrics.yaml, config/log4j2.xml
      model-store/emotion_image.mar, model-store/emotion_video.mar

Nothing is typed again here: the archives come from ``export`` (handler, model-config.yaml),
the per-model workers, batching and timeouts from ``export.archive.TASKS``, the limits and the
metrics and logging settings from the repository's ``config.properties``, the ports, the
mount point and the envelope names from ``handlers.contract``.

Inside the pod TorchServe listens on 127.0.0.1 only, with token authorization off: its keys
are random per start (every replica would have its own), and the one client is in the pod
(KServe's model server in the same container, or the authenticating proxy of
``deploy/k8s/``); the metrics port listens on the pod's interface for Prometheus.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from export.__main__ import main as export_main
from export.archive import TASKS
from handlers.contract import KSERVE_MODEL_ROOT, KSERVE_POD_CPUS, KSERVE_PREDICTOR_PORT, SERVICE_ENVELOPES
from model_defs.defaults import SHIPPED_WEIGHTS
from serving.torchserve import CONFIG, read_properties

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STORE = REPO / "deploy" / "kserve" / "store"
ARCHIVE_VERSION = "1.0"
"""The version every archive is built with and the model snapshot names."""


@dataclass(frozen=True)
class StoreConfig:
    """One TorchServe configuration of the store."""

    protocol: str | None  # KServe protocol ("v1", "v2") or None: the plain REST API
    gpus: int  # GPUs per pod: one worker per model per GPU; 0: the archives' CPU workers
    tasks: tuple[str, ...]  # the models it serves


def _config_files() -> dict[str, StoreConfig]:
    files = {"config.properties": StoreConfig("v2", 0, tuple(TASKS))}
    for task in TASKS:
        name = TASKS[task].archive_name(task)
        files[f"{name}.properties"] = StoreConfig("v2", 0, (task,))
        files[f"{name}-gpu.properties"] = StoreConfig("v2", 1, (task,))
    files["rest.properties"] = StoreConfig(None, 0, tuple(TASKS))
    files["rest-gpu.properties"] = StoreConfig(None, 1, tuple(TASKS))
    return files


CONFIG_FILES: Mapping[str, StoreConfig] = _config_files()
"""The store's TorchServe configurations by file name (in ``config/``)."""

# Keys of the repository's config.properties that name local paths, addresses or the way
# models are loaded: rewritten for the pod; every other key (limits, queue, timeouts, metrics
# mode, model API off, no per-model pip installs) is carried over unchanged.
_REWRITTEN = ("inference_address", "management_address", "metrics_address", "grpc_inference_address",
              "grpc_management_address", "model_store", "load_models", "allowed_urls", "metrics_config",
              "vmargs")
_SIDE_FILES = ("metrics.yaml", "log4j2.xml")


def port_of(address: str) -> int:
    """The port of a TorchServe address such as ``http://127.0.0.1:8082``."""
    return int(address.rsplit(":", 1)[1])


def model_snapshot(tasks: Sequence[str], gpus: int = 0, envelope: bool = True) -> dict:
    """TorchServe's ``model_snapshot`` for the archives of ``tasks``: their workers, batching
    and timeouts as exported (one worker per GPU when ``gpus``); batch size 1 behind an
    envelope, because TorchServe's KServe envelopes answer only the first request of a batch
    (a batch of two requests fails both with 503 "number of batch response mismatched")."""
    models = {}
    for task in tasks:
        cfg = TASKS[task].model_config
        entry = {"defaultVersion": True, "marName": f"{TASKS[task].archive_name(task)}.mar",
                 "minWorkers": gpus or cfg["minWorkers"], "maxWorkers": gpus or cfg["maxWorkers"],
                 "batchSize": 1 if envelope else cfg["batchSize"], "maxBatchDelay": cfg["maxBatchDelay"],
                 "responseTimeout": cfg["responseTimeout"]}
        models[TASKS[task].archive_name(task)] = {ARCHIVE_VERSION: entry}
    return {"name": "startup.cfg", "modelCount": len(models), "models": models}


def store_properties(protocol: str | None = "v2", gpus: int = 0, root: str = KSERVE_MODEL_ROOT,
                     tasks: Sequence[str] = tuple(TASKS), base: Path = CONFIG) -> dict[str, str]:
    """The store's ``config.properties`` as key/value pairs, for KServe ``protocol`` ("v1",
    "v2") or none (the plain REST API), ``gpus`` GPUs per pod, the store mounted at ``root``."""
    base_props = read_properties(base)
    props = {k: v for k, v in base_props.items() if k not in _REWRITTEN}
    loopback = f"http://127.0.0.1:{KSERVE_PREDICTOR_PORT}"
    metrics_port = port_of(base_props["metrics_address"])
    props.update({
        "inference_address": loopback,
        "management_address": loopback,  # same port, as KServe's runtime expects; never exposed
        "metrics_address": f"http://0.0.0.0:{metrics_port}",
        "grpc_inference_address": "127.0.0.1",
        "grpc_management_address": "127.0.0.1",
        "disable_token_authorization": "true",
        "model_store": f"{root}/model-store",
        "load_models": "all",
        "allowed_urls": base_props["allowed_urls"].replace("/model_store/", "/model-store/"),
        "metrics_config": f"{root}/config/metrics.yaml",
        "vmargs": f"-Dlog4j.configurationFile=file://{root}/config/log4j2.xml",
        "model_snapshot": json.dumps(model_snapshot(tasks, gpus, envelope=protocol is not None),
                                     separators=(",", ":")),
    })
    if gpus:
        props["number_of_gpu"] = str(gpus)
    if protocol is not None:
        props["service_envelope"] = SERVICE_ENVELOPES[protocol]
    return props


def write_properties(path: Path, props: Mapping[str, str], comment: str) -> Path:
    """``props`` as a Java properties file under a ``#`` comment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {line}" for line in comment.splitlines()] + [f"{k}={v}" for k, v in props.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_configs(store: Path, root: str = KSERVE_MODEL_ROOT,
                  files: Mapping[str, StoreConfig] = CONFIG_FILES) -> list[Path]:
    """``store/config/``: every configuration of ``files`` and the files they name."""
    config_dir = store / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    for name in _SIDE_FILES:
        shutil.copyfile(CONFIG.parent / name, config_dir / name)
    written = []
    for name, cfg in files.items():
        what = (f"KServe {cfg.protocol} ({SERVICE_ENVELOPES[cfg.protocol]} envelope)" if cfg.protocol
                else "the plain REST API (/predictions)")
        device = f"{cfg.gpus} GPU(s): one worker per model per GPU" if cfg.gpus else "CPU"
        models = ", ".join(TASKS[t].archive_name(t) for t in cfg.tasks)
        comment = (f"Written by `python -m deploy.kserve_store` (make kserve-store): do not edit.\n"
                   f"TorchServe for {what}, {device}, models: {models}; store mounted at {root}.")
        props = store_properties(cfg.protocol, cfg.gpus, root, cfg.tasks)
        written.append(write_properties(config_dir / name, props, comment))
    return written


def worker_threads(task: str) -> int:
    """Torch threads per CPU worker in a pod of :data:`KSERVE_POD_CPUS` CPUs."""
    return max(1, KSERVE_POD_CPUS // TASKS[task].model_config["maxWorkers"])


def build_store(store: Path = DEFAULT_STORE, checkpoints: Mapping[str, Path] | None = None,
                root: str = KSERVE_MODEL_ROOT) -> Path:
    """Export every task's archive into ``store/model-store/`` (torch threads sized for the
    pod: :func:`worker_threads`) and write ``store/config/``."""
    checkpoints = checkpoints or {task: SHIPPED_WEIGHTS[task] for task in TASKS}
    model_store = store / "model-store"
    shutil.rmtree(store / "config", ignore_errors=True)  # no configuration of an older build stays
    for task, ckpt in checkpoints.items():
        if export_main(["--task", task, "--checkpoint", str(ckpt), "--out", str(model_store),
                        "--version", ARCHIVE_VERSION, "--threads", str(worker_threads(task))]) != 0:
            raise RuntimeError(f"export of the {task} archive from {ckpt} failed")
    write_configs(store, root)
    return store


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deploy.kserve_store", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_STORE, help="the store folder")
    p.add_argument("--root", default=KSERVE_MODEL_ROOT,
                   help="where the store is mounted when served (KServe: %(default)s)")
    p.add_argument("--config-only", action="store_true", help="rewrite config/ only, keep the archives")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.config_only:
        write_configs(args.out, args.root)
    else:
        build_store(args.out, root=args.root)
    for path in sorted(p for p in args.out.rglob("*") if p.is_file()):
        logger.info("%s (%d bytes)", os.path.relpath(path), path.stat().st_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
