"""``python -m serving start|stop``: the Makefile's ``serve`` and ``stop``.

``start`` starts TorchServe in the background from the current folder (logs, ``key_file.json``)
and returns once every model has a READY worker; if one does not come up in time it prints the
logs, stops the server and exits 1. ``stop`` stops the running TorchServe and waits for it.
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from .torchserve import CONFIG, TorchServe, stop_server

logger = logging.getLogger("serving")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start TorchServe and wait until every model is READY")
    start.add_argument("models", nargs="+", help="archives in the model store (emotion_image.mar or name=file.mar)")
    start.add_argument("--model-store", type=Path, default=Path("model_store"))
    start.add_argument("--config", type=Path, default=CONFIG, help="TorchServe config.properties")
    start.add_argument("--workdir", type=Path, default=Path("."), help="where logs and key_file.json go")
    start.add_argument("--timeout", type=float, default=180.0, help="seconds for every model to be READY")
    stop = sub.add_parser("stop", help="stop the running TorchServe and wait for its processes to exit")
    stop.add_argument("--timeout", type=float, default=60.0)
    return p.parse_args(argv)


def start(args: argparse.Namespace) -> int:
    server = TorchServe(args.model_store, args.models, args.workdir, args.config)
    try:  # refuses when a TorchServe already runs (the pid file is machine-wide)
        server.start(args.timeout)
    except BaseException as e:
        server.stop()  # a failed start leaves nothing running
        if not isinstance(e, (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError)):
            raise
        logger.error("ERROR: %s", e)
        return 1
    for name in server.model_names:
        logger.info("%s READY", name)
    logger.info("TorchServe is up: inference %s, gRPC %s; keys in %s", server.inference_url,
                server.grpc_inference, server.workdir / "key_file.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.command == "start":
        return start(args)
    if not stop_server(timeout=args.timeout):
        logger.info("no TorchServe running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
