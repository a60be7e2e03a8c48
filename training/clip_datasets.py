"""Clip datasets for the video model. Items are ``(clip (C, T, S, S) float normalized, label)``.

* :class:`ClipDataset` over clip sources, each either a folder of frame images (the seed's AFEW
  layout) or a video file (MP4, MOV, AVI, WebM, MKV, GIF), built by :func:`afew_list`,
  :func:`csv_clips` or :func:`folder_clips` (or :func:`video_dataset`, which picks one).
  ``clip_len`` frames are sampled at random offsets in training and uniformly at evaluation
  (``handlers.video_decode.sample_indices``, as in serving); each frame goes through
  ``frame_transform`` (default: the whole frame → ``handlers.preprocess.to_model_input``; pass
  face detection + alignment for real videos).
* :class:`StillClipDataset`: clips synthesized from still face crops with smooth random motion,
  scale, rotation and lighting drift over the clip, to bootstrap the temporal parts of the model.

Frames are stacked ``(T, C, S, S)`` and *permuted* to ``(C, T, S, S)`` (a reshape would scramble them).
"""
from __future__ import annotations

import logging
import math
import random
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from handlers.preprocess import InputError, decode_image, normalize, to_model_input
from handlers.video_decode import VideoLimits, read_clip, sample_indices

from .datasets import IMAGE_EXTS
from .labelled_files import class_counts, class_folders, label_index, read_labels_csv, read_list_file

log = logging.getLogger(__name__)

VIDEO_EXTS = {".mp4", ".m4v", ".mov", ".avi", ".webm", ".mkv", ".gif"}

FrameTransform = Callable[[Image.Image], torch.Tensor]
"""An RGB PIL frame → normalized ``(C, S, S)`` float tensor."""

# Training reads the user's own files: more generous bounds than serving.
TRAIN_LIMITS = VideoLimits(max_bytes=2 << 30, max_duration_s=3600.0, max_frames=100_000)


def frames_to_clip(frames: Sequence[torch.Tensor]) -> torch.Tensor:
    """``T`` frames ``(C, S, S)`` → clip ``(C, T, S, S)`` (stack, then permute time and channels)."""
    return torch.stack(list(frames)).permute(1, 0, 2, 3).contiguous()


def _natural_key(path: Path) -> list[Any]:
    return [int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", path.name)]


def frame_files(folder: Path) -> list[Path]:
    """The frame images in ``folder``, in natural order (``frame2`` before ``frame10``)."""
    return sorted((f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTS and f.is_file()), key=_natural_key)


class ClipDataset(Dataset):
    """Clips from frame folders and/or video files, with their labels."""

    def __init__(self, sources: Sequence[Path], labels: Sequence[int], spec: Mapping[str, Any],
                 train: bool = False, frame_transform: FrameTransform | None = None,
                 clip_len: int | None = None, hflip: bool | None = None,
                 limits: VideoLimits = TRAIN_LIMITS) -> None:
        if not sources:
            raise ValueError("no clips")
        self.sources, self.labels = [Path(s) for s in sources], list(labels)
        self.spec, self.train, self.limits = dict(spec), train, limits
        self.clip_len = int(clip_len or self.spec.get("clip_len") or 16)
        self.frame_transform = frame_transform or partial(to_model_input, spec=self.spec)
        self.hflip = train if hflip is None else hflip

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        clip = frames_to_clip([self.frame_transform(f) for f in self.frames(i)])
        if self.hflip and random.random() < 0.5:
            clip = clip.flip(-1)
        return clip, self.labels[i]

    def frames(self, i: int) -> list[Image.Image]:
        """The ``clip_len`` sampled RGB frames of clip ``i``."""
        src, mode = self.sources[i], "random" if self.train else "uniform"
        try:
            if src.is_dir():
                files = frame_files(src)
                if not files:
                    raise ValueError(f"{src}: no frame images")
                return [decode_image(files[j].read_bytes()) for j in sample_indices(len(files), self.clip_len, mode)]
            return read_clip(src, self.clip_len, self.limits, mode).frames
        except InputError as e:
            raise ValueError(f"{src}: {e}") from e

    def class_counts(self) -> list[int]:
        return class_counts(self.labels)


def afew_list(root: str | Path, list_file: str | Path, spec: Mapping[str, Any], one_based: bool = False,
              **kw: Any) -> ClipDataset:
    """The seed's AFEW layout: ``relative/clip_folder label`` lines (0-6, or 1-7 with ``one_based``)."""
    sources, labels = read_list_file(root, list_file, one_based)
    return ClipDataset(sources, labels, spec, **kw)


def csv_clips(csv_file: str | Path, spec: Mapping[str, Any], **kw: Any) -> ClipDataset:
    """Videos listed in a CSV (``file,emotion`` header, other columns ignored), paths relative to
    the CSV's folder or its ``videos/`` sub-folder. Unknown emotions are skipped with a warning."""
    sources, labels = read_labels_csv(csv_file, ("file", "video", "path"), "videos", "clips")
    return ClipDataset(sources, labels, spec, **kw)


def folder_clips(root: str | Path, spec: Mapping[str, Any], **kw: Any) -> ClipDataset:
    """``root/<class>/<clip>`` where each clip is a video file or a folder of frame images."""
    sources, labels = class_folders(root, _clips_in, "video or frame folder")
    return ClipDataset(sources, labels, spec, **kw)


def _clips_in(folder: Path) -> list[Path]:
    return [c for c in sorted(folder.iterdir(), key=_natural_key)
            if (c.is_file() and c.suffix.lower() in VIDEO_EXTS) or (c.is_dir() and frame_files(c))]


# Words in a file name that name an emotion (``furious_talk1_clip1.mp4`` is angry).
NAME_WORDS: dict[str, str] = {"furious": "angry", "angry": "angry", "disgust": "disgust", "fear": "fear",
                              "happy": "happy", "neutral": "neutral", "sad": "sad", "surprise": "surprise"}


def label_from_name(name: str) -> int | None:
    """The emotion a file name carries (one of :data:`NAME_WORDS` in it, exactly one emotion), else None."""
    stem = Path(name).stem.lower()
    found = {NAME_WORDS[w] for w in NAME_WORDS if w in stem}
    return label_index(found.pop()) if len(found) == 1 else None


def named_clips(folder: str | Path, spec: Mapping[str, Any], **kw: Any) -> ClipDataset:
    """The videos in ``folder`` whose file names carry an emotion (:func:`label_from_name`)."""
    sources, labels = [], []
    for f in sorted(Path(folder).iterdir(), key=_natural_key):
        idx = label_from_name(f.name) if f.suffix.lower() in VIDEO_EXTS else None
        if idx is not None:
            sources.append(f)
            labels.append(idx)
    if not sources:
        raise ValueError(f"{folder}: no video whose name carries an emotion ({', '.join(NAME_WORDS)})")
    return ClipDataset(sources, labels, spec, **kw)


def video_dataset(path: str | Path, spec: Mapping[str, Any], list_file: str | Path | None = None,
                  one_based: bool = False, **kw: Any) -> ClipDataset:
    """A list file over frame folders (AFEW), a ``labels.csv`` (or a CSV path), or class folders."""
    path = Path(path)
    if list_file is not None:
        return afew_list(path, list_file, spec, one_based=one_based, **kw)
    if path.is_file() and path.suffix.lower() == ".csv":
        return csv_clips(path, spec, **kw)
    if (path / "labels.csv").is_file():
        return csv_clips(path / "labels.csv", spec, **kw)
    return folder_clips(path, spec, **kw)


@dataclass
class MotionConfig:
    """Ranges of the synthetic motion; each parameter follows a smooth path through ``keys`` random values."""

    shift: float = 0.08  # translation, fraction of the image side
    scale: float = 0.10  # zoom, +- fraction
    rotate: float = 10.0  # degrees
    gain: float = 0.25  # contrast, +- fraction
    bias: float = 0.08  # brightness, +- (on 0..1 pixels)
    noise: float = 0.01  # per-frame sensor noise std
    keys: int = 3  # random values along the clip, smoothly interpolated
    hflip: float = 0.5  # probability of mirroring the whole clip


def smooth_path(t: int, keys: int, amplitude: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """``t`` values moving smoothly (smoothstep) through ``keys`` random values in ``[-amplitude, amplitude]``."""
    k = torch.empty(max(keys, 2)).uniform_(-amplitude, amplitude, generator=gen)
    pos = torch.linspace(0, len(k) - 1, t)
    lo = pos.floor().long().clamp(max=len(k) - 2)
    frac = pos - lo
    frac = frac * frac * (3 - 2 * frac)
    return k[lo] * (1 - frac) + k[lo + 1] * frac


class StillClipDataset(Dataset):
    """Clips made from still face crops: ``base`` yields ``(uint8 (C, S, S), label)`` (e.g.
    ``training.datasets.ImageFolderDataset`` on FER2013 train, or its in-memory cache)."""

    def __init__(self, base: Dataset, spec: Mapping[str, Any], clip_len: int | None = None,
                 motion: MotionConfig | None = None) -> None:
        self.base, self.spec = base, dict(spec)
        self.clip_len = int(clip_len or self.spec.get("clip_len") or 16)
        self.motion = motion or MotionConfig()

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label = self.base[i]
        return self.animate(img), int(label)

    def animate(self, img: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """uint8 ``(C, S, S)`` still → normalized clip ``(C, T, S, S)``."""
        m, t = self.motion, self.clip_len
        x = img.float().div(255.0).unsqueeze(0).expand(t, -1, -1, -1)
        angle = smooth_path(t, m.keys, math.radians(m.rotate), gen)
        scale = 1.0 + smooth_path(t, m.keys, m.scale, gen)
        tx, ty = (smooth_path(t, m.keys, 2 * m.shift, gen) for _ in range(2))  # grid units: side = 2
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        frames = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        gain = (1.0 + smooth_path(t, m.keys, m.gain, gen)).view(t, 1, 1, 1)
        bias = smooth_path(t, m.keys, m.bias, gen).view(t, 1, 1, 1)
        frames = (frames - 0.5) * gain + 0.5 + bias
        if m.noise > 0:
            frames = frames + torch.randn(frames.shape, generator=gen) * m.noise
        if torch.rand((), generator=gen) < m.hflip:
            frames = frames.flip(-1)
        frames = (frames.clamp(0, 1) * 255.0).round()
        return normalize(frames, self.spec).permute(1, 0, 2, 3).contiguous()
