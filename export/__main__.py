"""``python -m export --task image --checkpoint pretrain/emotion_image.pth --out model_store/``"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from model_defs import load_model

from .archive import ALL_TASKS, SERIALIZED_NAME, build_archive, model_config_for
from .torchscript import export_torchscript

logger = logging.getLogger("export")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    p.add_argument("--task", choices=sorted(ALL_TASKS), required=True)
    p.add_argument("--checkpoint", type=Path, required=True, help="weights file (model_defs format)")
    p.add_argument("--out", type=Path, default=Path("model_store"), help="folder for the .mar")
    p.add_argument("--version", default="1.0", help="model version recorded in the archive")
    p.add_argument("--batch-size", type=int, help="TorchServe batchSize (default per task)")
    p.add_argument("--max-batch-delay", type=int, help="TorchServe maxBatchDelay in ms")
    p.add_argument("--workers", type=int, help="minWorkers = maxWorkers")
    p.add_argument("--response-timeout", type=int, help="TorchServe responseTimeout in s")
    p.add_argument("--threads", type=int,
                   help="torch threads per worker (handler option; default: the cores / maxWorkers)")
    p.add_argument("--sequence-idle-ms", type=int, help="a stream's sequenceMaxIdleMSec (task live)")
    p.add_argument("--keep-torchscript", type=Path, help="also keep the TorchScript file here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    model = load_model(args.checkpoint)
    spec = model.spec.to_dict()
    wanted = ALL_TASKS[args.task].checkpoint_task or args.task
    if spec["task"] != wanted:
        logger.error("%s holds a %r model, not %r", args.checkpoint, spec["task"], wanted)
        return 2
    overrides = {k: v for k, v in {
        "batchSize": args.batch_size, "maxBatchDelay": args.max_batch_delay,
        "minWorkers": args.workers, "maxWorkers": args.workers,
        "responseTimeout": args.response_timeout, "sequenceMaxIdleMSec": args.sequence_idle_ms}.items()
        if v is not None}
    handler_overrides = {"threads": args.threads} if args.threads is not None else None
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        ts_path = export_torchscript(model, spec, args.keep_torchscript or Path(tmp) / SERIALIZED_NAME)
        mar = build_archive(args.task, ts_path, spec, args.out, version=args.version,
                            model_config=model_config_for(args.task, overrides, handler_overrides))
    logger.info("wrote %s (%s, %s)", mar, spec["arch"], args.checkpoint)
    print(mar)
    return 0


if __name__ == "__main__":
    sys.exit(main())
