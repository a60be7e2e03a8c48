"""The project's defaults per task: the network ``training.run`` and the SDK build, and where the
shipped trained weights live (``make serve``, ``training.evaluate``, the SDK and the benchmarks
read them from here)."""
from __future__ import annotations

from pathlib import Path

TASKS: tuple[str, ...] = ("image", "video")
DEFAULT_MODEL: dict[str, str] = {"image": "emo_mobilenet_v2", "video": "emo_video_hybrid"}
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "pretrain"
SHIPPED_WEIGHTS: dict[str, Path] = {task: SHIPPED_DIR / f"emotion_{task}.pth" for task in TASKS}
