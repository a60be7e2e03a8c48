"""Package a verified TorchScript file and the handler code into a TorchServe ``.mar``.

Which handler, archive name and TorchServe settings go with each task is declared in
:data:`TASKS`; the ``handler:`` section of ``model-config.yaml`` is written from the handlers'
own defaults (``handlers.contract.HANDLER_DEFAULTS``), not typed again here. Every shared module in ``handlers/`` (all ``*.py`` but ``__init__.py`` and
the ``*_handler.py`` entry points) goes into every archive as an extra file; inside a
``.mar`` extra files land flat beside the handler, which the handlers allow for.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from handlers.contract import HANDLER_DEFAULTS, LIVE_SEQUENCE_IDLE_MS, LIVE_SEQUENCES_PER_WORKER

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
HANDLERS_DIR = REPO / "handlers"
SERIALIZED_NAME = "model.pt"


@dataclass(frozen=True)
class TaskPackage:
    """What goes into the archive of one task."""

    handler: str  # path relative to the repository root
    model_config: Mapping[str, Any] = field(default_factory=dict)  # model-config.yaml (TorchServe keys)
    checkpoint_task: str = ""  # the task of the checkpoint it is built from ("": its own)

    def archive_name(self, task: str) -> str:
        return f"emotion_{task}"


TASKS: dict[str, TaskPackage] = {
    "image": TaskPackage(
        handler="handlers/image_handler.py",
        # Measured with bench/tune_image.py on 2 CPU cores (crops, concurrency 8 and 32): two
        # single-threaded workers serve 4-6x the requests/s of one two-threaded worker (intra-op
        # threads on a busy machine wait on each other; two workers also overlap one's decoding
        # with the other's forward pass); small batches (4) with a short delay (5 ms) beat 8-32,
        # as the 48x48 model's per-crop cost is lowest at small batches.
        model_config={"minWorkers": 2, "maxWorkers": 2, "batchSize": 4, "maxBatchDelay": 5,
                      "responseTimeout": 60, "startupTimeout": 120},
    ),
    "video": TaskPackage(
        handler="handlers/video_handler.py",
        # A clip takes hundreds of ms, so clips that arrive while one is served queue up and form
        # the next batch by themselves; waiting for more (the first default was 50 ms) only
        # delays a lone clip (bench/bench_detectors.py, the 1080p clip at concurrency 1).
        model_config={"minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 5,
                      "responseTimeout": 300, "startupTimeout": 120},
    ),
}


STREAM_TASKS: dict[str, TaskPackage] = {
    # one frame per request of a sequence (TorchServe's sequence batching), built from the video
    # model's per-frame checkpoint; not in the KServe store: KServe's protocols carry no sequence id.
    # A worker serves batchSize sequences at once (one poll per batch slot); maxNumSequence is
    # batchSize x maxWorkers (model_config_for), beyond it TorchServe refuses a new sequence.
    "live": TaskPackage(
        handler="handlers/live_handler.py", checkpoint_task="video",
        model_config={"minWorkers": 1, "maxWorkers": 1, "batchSize": LIVE_SEQUENCES_PER_WORKER,
                      "maxBatchDelay": 5, "responseTimeout": 30, "startupTimeout": 120,
                      "sequenceBatching": True, "sequenceMaxIdleMSec": LIVE_SEQUENCE_IDLE_MS,
                      "maxSequenceJobQueueSize": 2},
    ),
}

ALL_TASKS: dict[str, TaskPackage] = {**TASKS, **STREAM_TASKS}
"""Every archive ``export`` builds: the request/response tasks and the streams."""


def shared_handler_modules(handlers_dir: Path = HANDLERS_DIR) -> list[Path]:
    """The handler-side modules every archive carries (not ``__init__`` nor entry points)."""
    return sorted(p for p in handlers_dir.glob("*.py")
                  if p.name != "__init__.py" and not p.name.endswith("_handler.py"))


def model_config_for(task: str, overrides: Mapping[str, Any] | None = None,
                     handler_overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``model-config.yaml`` content for ``task`` with optional overrides: the task's
    TorchServe settings and, as its ``handler:`` section, the handler's defaults."""
    cfg = {**ALL_TASKS[task].model_config, **(overrides or {})}
    if cfg.get("sequenceBatching"):
        cfg["maxNumSequence"] = int(cfg["batchSize"]) * int(cfg["maxWorkers"])
    cfg["handler"] = {**HANDLER_DEFAULTS[task], **(handler_overrides or {})}
    if cfg.get("sequenceBatching"):  # the handler keeps state for as many sequences as it is sent
        cfg["handler"]["max_sequences"] = int(cfg["batchSize"])
        cfg["handler"]["idle_seconds"] = int(cfg["sequenceMaxIdleMSec"]) / 1000
    return cfg


def index_to_name(labels: list[str]) -> dict[str, str]:
    """TorchServe's ``index_to_name.json`` mapping."""
    return {str(i): name for i, name in enumerate(labels)}


def build_archive(task: str, scripted_path: str | os.PathLike, spec: Mapping[str, Any],
                  out_dir: str | os.PathLike, version: str = "1.0",
                  model_config: Mapping[str, Any] | None = None) -> Path:
    """Write ``out_dir/emotion_<task>.mar`` holding the TorchScript file, handler and configs."""
    if task not in ALL_TASKS:
        raise KeyError(f"unknown task {task!r}; known: {', '.join(ALL_TASKS)}")
    pkg = ALL_TASKS[task]
    handler = REPO / pkg.handler
    if not handler.is_file():
        raise FileNotFoundError(f"handler for task {task!r} not found: {handler}")
    cfg = dict(model_config) if model_config is not None else model_config_for(task)
    return run_archiver(pkg.archive_name(task), scripted_path, str(handler), list(spec["labels"]), cfg,
                        out_dir, version, shared_handler_modules())


def run_archiver(name: str, scripted_path: str | os.PathLike, handler: str, labels: list[str],
                 model_config: Mapping[str, Any], out_dir: str | os.PathLike, version: str = "1.0",
                 extra_files: Sequence[str | os.PathLike] = ()) -> Path:
    """``out_dir/<name>.mar``: the serialized model, ``handler`` (a file or a TorchServe
    built-in name), ``index_to_name.json`` for ``labels``, ``model_config`` as
    ``model-config.yaml`` and ``extra_files``.

    Runs ``torch-model-archiver`` (as ``python -m model_archiver.model_packaging``) with a
    private ``TMPDIR``, because it stages files in ``$TMPDIR/<model name>`` and two builds
    of the same archive at once would otherwise share that folder.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"export-{name}-") as tmp:
        tmp = Path(tmp)
        (tmp / "index_to_name.json").write_text(json.dumps(index_to_name(labels), indent=1))
        (tmp / "model-config.yaml").write_text(yaml.safe_dump(dict(model_config), sort_keys=False))
        extra = [str(p) for p in extra_files] + [str(tmp / "index_to_name.json")]
        staging = tmp / "staging"
        staging.mkdir()
        cmd = [sys.executable, "-m", "model_archiver.model_packaging",
               "--model-name", name, "--version", version,
               "--serialized-file", str(Path(scripted_path).resolve()),
               "--handler", handler, "--extra-files", ",".join(extra),
               "--config-file", str(tmp / "model-config.yaml"),
               "--export-path", str(out_dir.resolve()), "--force"]
        logger.info("running %s", " ".join(cmd))
        res = subprocess.run(cmd, env={**os.environ, "TMPDIR": str(staging)},
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    mar = out_dir / f"{name}.mar"
    if not mar.is_file():
        raise RuntimeError(f"torch-model-archiver reported success but {mar} is missing")
    return mar
