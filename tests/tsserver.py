"""Test helpers around a served model (the server itself: ``serving.running_server``)."""
from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import requests
import torch

from model_defs import create_model, save_weights

REPO = Path(__file__).resolve().parents[1]


def send_together(send: Callable[[bytes], Any], bodies: list[bytes]) -> list:
    """Call ``send(body)`` for every body from its own thread, all released at once, so that
    TorchServe puts them in one batch; returns the results in order."""
    start = threading.Barrier(len(bodies))

    def go(body: bytes):
        start.wait()
        return send(body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(go, bodies))


def image_weights(tmp: Path) -> Path:
    """The shipped image weights, or seeded random ones in ``tmp`` before any are shipped."""
    shipped = REPO / "pretrain" / "emotion_image.pth"
    if shipped.is_file():
        return shipped
    torch.manual_seed(0)
    save_weights(create_model("emo_resnet_s"), tmp / "random.pth")
    return tmp / "random.pth"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (closed again before it is returned)."""
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    """Wait until ``GET url`` answers 200 while ``proc`` (which serves it) runs; fail with its log."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(requests.ConnectionError):
            if requests.get(url, timeout=2).status_code == 200:
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{url} did not come up (exit {proc.poll()}):\n"
                                 f"{log.read_text(errors='replace')[-3000:] if log.is_file() else ''}")
        time.sleep(0.2)
