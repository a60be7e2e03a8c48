"""Records of one batch of video requests, for ``video_handler`` (TorchServe wants the handler
module itself to define a single class)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

try:  # inside the repository (package import)
    from . import common, video_decode
except ImportError:  # inside a .mar the shared modules sit flat beside the handler
    import common  # type: ignore[no-redef]
    import video_decode  # type: ignore[no-redef]


@dataclass
class VideoRequest:
    """One usable request: what was probed, the clips to classify and their frames."""

    idx: int
    info: video_decode.VideoInfo
    clips: list[list[int]]  # frame indices per clip: the overall clip first, then the windows
    windows: list[video_decode.Window]
    frames: dict[int, Image.Image] = field(default_factory=dict)
    crops: dict[int, torch.Tensor] = field(default_factory=dict)  # frame index -> (C, S, S)
    found: int = 0  # sampled frames with a detected face


@dataclass
class VideoBatch:
    """The usable requests of a batch, their clips as one tensor, and the failed requests."""

    n_requests: int
    requests: list[VideoRequest] = field(default_factory=list)
    failures: common.Failures = field(default_factory=common.Failures)
    clips: torch.Tensor | None = None
