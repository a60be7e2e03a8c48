"""Records of one batch of video requests, for ``video_handler`` and ``video_pipeline``
(TorchServe wants the handler module itself to define a single class)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

try:  # inside the repository (package import)
    from . import common, video_decode
    from .video_track import KeyframeTracker, Track
except ImportError:  # inside a .mar the shared modules sit flat beside the handler
    import common  # type: ignore[no-redef]
    import video_decode  # type: ignore[no-redef]
    from video_track import KeyframeTracker, Track  # type: ignore[no-redef]


@dataclass
class Person:
    """One tracked face (``track``), or the whole frame when no face was found (``track`` None)."""

    track: Track | None
    crops: dict[int, torch.Tensor] = field(default_factory=dict)  # frame index -> model input (C, S, S)
    found: int = 0  # sampled frames where this person's face was detected or tracked
    clips: list[list[int]] = field(default_factory=list)  # frame indices: the whole span first, then windows
    windows: list[video_decode.Window] = field(default_factory=list)  # the windows of clips[1:]
    frame_probs: dict[int, torch.Tensor] = field(default_factory=dict)  # a per-frame model's, per frame
    probs: list[torch.Tensor] = field(default_factory=list)  # per clip, after inference


@dataclass
class VideoRequest:
    """One usable request: what was probed, the frames sampled, the people found in them."""

    idx: int
    info: video_decode.VideoInfo
    sampled: list[int]  # frame indices, sorted
    windows: list[video_decode.Window]  # timeline windows (empty for a video of one window)
    clips: list[list[int]]  # frame indices per clip: the overall clip first, then one per window
    frames: dict[int, Image.Image] = field(default_factory=dict)
    tracker: KeyframeTracker | None = None
    people: list[Person] = field(default_factory=list)  # the main person first

    @property
    def found(self) -> int:
        """Sampled frames with the main person's face (detected or tracked)."""
        return self.people[0].found if self.people else 0


@dataclass
class VideoBatch:
    """The usable requests of a batch, their model inputs as one tensor, and the failed requests."""

    n_requests: int
    requests: list[VideoRequest] = field(default_factory=list)
    failures: common.Failures = field(default_factory=common.Failures)
    clips: torch.Tensor | None = None
