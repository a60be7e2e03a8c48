"""A TorchServe ``Context`` for calling a handler directly (unit tests; no server)."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import yaml
from ts.context import Context, RequestProcessor

from export.__main__ import main as export_main


class _Metrics:
    """A metrics cache that accepts TorchServe's timing calls and keeps nothing."""

    def add_time(self, *args, **kwargs) -> None:
        pass


def make_context(model_dir: Path, n: int, handler_options: dict | None = None) -> Context:
    """The context TorchServe would pass for a batch of ``n`` requests to the extracted archive
    in ``model_dir``; ``handler_options`` override its model-config.yaml ``handler`` section."""
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    cfg = yaml.safe_load((model_dir / "model-config.yaml").read_text())
    cfg["handler"] = {**(cfg.get("handler") or {}), **(handler_options or {})}
    ctx = Context(manifest["model"]["modelName"], str(model_dir), manifest, int(cfg.get("batchSize", 1)),
                  None, "0.12.0", metrics=_Metrics(), model_yaml_config=cfg)
    ctx.request_processor = [RequestProcessor({}) for _ in range(n)]
    return ctx


def run_handler(handler: Any, model_dir: Path, rows: list) -> tuple[list, list[int]]:
    """``handler.handle(rows)`` as one batch; its answers and each request's HTTP status."""
    ctx = make_context(model_dir, len(rows))
    out = handler.handle(rows, ctx)
    return out, [ctx.get_response_status(i)[0] for i in range(len(rows))]


def extracted_archive(task: str, checkpoint: Path, tmp: Path) -> Path:
    """``python -m export`` of ``checkpoint`` into ``tmp``, extracted as TorchServe would: the model folder."""
    assert export_main(["--task", task, "--checkpoint", str(checkpoint), "--out", str(tmp)]) == 0
    with zipfile.ZipFile(tmp / f"emotion_{task}.mar") as z:
        z.extractall(tmp / "model")
    return tmp / "model"
