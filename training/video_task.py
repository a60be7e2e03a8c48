"""Dataset wiring for ``--task video`` in ``training.run`` and ``training.evaluate``.

Real clips come from ``training.clip_datasets`` (AFEW frame folders + list file, a
``labels.csv`` of videos, or class folders). With ``--still-clips DIR`` the training clips are
synthesised from a folder of still face crops (e.g. FER2013 train) with smooth temporal
augmentation, which is how the shipped video model was bootstrapped (see pretrain/MODEL_CARD.md).
With ``--detect-faces`` each sampled frame goes through the handler's detection and alignment.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from handlers.preprocess import to_model_input
from handlers.video_pipeline import is_frame_model
from handlers.video_pool import pool, pooling_from_spec
from model_defs import unwrap

from .datasets import ImageFolderDataset, detected_face_crop, cache_in_memory, random_subset
from .engine import predict_logits
from .clip_datasets import ClipDataset, StillClipDataset, video_dataset
from .sources import LoadOptions, Source


def frame_transform(spec: dict[str, Any], detect_faces: bool, device: str = "cpu") -> Callable:
    """PIL frame → normalized ``(C, S, S)``: the largest aligned face (or the whole frame)."""
    if not detect_faces:
        return partial(to_model_input, spec=spec)
    crop = detected_face_crop(spec, device)
    return lambda img: to_model_input(crop(img), spec)


def _clips(src: Source, spec: dict[str, Any], **kw: Any) -> ClipDataset:
    """A source's clips: a list file over frame folders (relative to ``src.root``), a labels CSV or class folders."""
    if src.path.is_file() and src.path.suffix.lower() != ".csv":
        return video_dataset(src.root or src.path.parent, spec, list_file=src.path, one_based=src.one_based, **kw)
    return video_dataset(src.path, spec, **kw)


def video_datasets(train: Source | None, val: Source | None, spec: dict[str, Any], opts: LoadOptions,
                   still_clips: Path | None = None, detect_faces: bool = False) -> tuple[Dataset, Dataset, list[int]]:
    """Training and validation clip datasets for ``training.run --task video``: real training
    clips, or clips synthesised from the face stills in ``still_clips``."""
    if still_clips is not None:
        stills = ImageFolderDataset(still_clips, spec)
        counts = stills.class_counts()
        base: Dataset = stills
        if opts.subset:
            base, counts = random_subset(stills, stills.labels, opts.subset, opts.seed)
        if opts.cache:
            base = cache_in_memory(base, opts.workers)
        train_ds: Dataset = StillClipDataset(base, spec)
    elif train is not None:
        train_ds = _clips(train, spec, train=True, frame_transform=frame_transform(spec, detect_faces))
        counts = train_ds.class_counts()
    else:
        raise SystemExit("--task video needs training clips (--data, --train-dir, --train-list) or --still-clips")
    if val is None:
        raise SystemExit("--task video needs --val-dir or --data with a val/ folder")
    val_ds = _clips(val, spec, train=False, frame_transform=frame_transform(spec, detect_faces))
    return train_ds, val_ds, counts


def clip_probs(model: nn.Module, clips: torch.Tensor, tta_flip: bool | None = None) -> torch.Tensor:
    """Clip probabilities ``(N, K)`` for normalized clips ``(N, C, T, S, S)``, as served: a per-frame
    video model scores each frame (the spec's mirror averaging and temperature) and pools them by
    the spec's pooling (``handlers/video_pool.py``); a clip model scores the clip."""
    spec = unwrap(model).spec.to_dict()
    if not is_frame_model(spec):
        return predict_logits(model, clips, tta_flip).float().softmax(-1)
    n, c, t = clips.shape[:3]
    frames = clips.permute(0, 2, 1, 3, 4).reshape(n * t, c, *clips.shape[3:])
    probs = predict_logits(model, frames, tta_flip).float().softmax(-1).view(n, t, -1)
    method, params = pooling_from_spec(spec)
    return torch.stack([pool(p, spec["labels"], method, params) for p in probs])
