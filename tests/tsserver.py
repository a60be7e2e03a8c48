"""Test helpers around a served model (the server itself: ``serving.running_server``)."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

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
