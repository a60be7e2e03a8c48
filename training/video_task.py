"""Dataset wiring for ``--task video`` in ``training.run`` and ``training.evaluate``.

Real clips come from ``training.clip_datasets`` (AFEW frame folders + list file, a
``labels.csv`` of videos, or class folders). With ``--still-clips DIR`` the training clips are
synthesised from a folder of still face crops (e.g. FER2013 train) with smooth temporal
augmentation, which is how the shipped video model was bootstrapped (see pretrain/MODEL_CARD.md).
With ``--detect-faces`` each sampled frame goes through the handler's detection and alignment.
"""
from __future__ import annotations

import argparse
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


def frame_transform(spec: dict[str, Any], detect_faces: bool, device: str = "cpu") -> Callable:
    """PIL frame → normalized ``(C, S, S)``: the largest aligned face (or the whole frame)."""
    if not detect_faces:
        return partial(to_model_input, spec=spec)
    crop = detected_face_crop(spec, device)
    return lambda img: to_model_input(crop(img), spec)


def video_eval_dataset(data: str | Path, spec: dict[str, Any], detect_faces: bool = False,
                       device: str = "cpu", list_file: str | None = None, one_based: bool = False) -> ClipDataset:
    """Evaluation clips (16 frames sampled uniformly, as the handler does)."""
    return video_dataset(data, spec, list_file=list_file, one_based=one_based, train=False,
                         frame_transform=frame_transform(spec, detect_faces, device))


def video_datasets(args: argparse.Namespace, spec: dict[str, Any]) -> tuple[Dataset, Dataset, list[int]]:
    """Training and validation clip datasets for ``training.run --task video``."""
    root = Path(args.data) if args.data else None
    detect = getattr(args, "detect_faces", False)
    if args.still_clips:
        stills = ImageFolderDataset(args.still_clips, spec)
        counts = stills.class_counts()
        base: Dataset = stills
        if args.subset:
            base, counts = random_subset(stills, stills.labels, args.subset, args.seed)
        if args.cache:
            base = cache_in_memory(base, args.workers)
        train: Dataset = StillClipDataset(base, spec)
    else:
        train_src = args.train_dir or (root / "train" if root else None)
        train = video_dataset(train_src, spec, list_file=args.train_list, one_based=args.one_based,
                              train=True, frame_transform=frame_transform(spec, detect))
        counts = train.class_counts()
    val_src = args.val_dir or (root / "val" if root else None)
    if val_src is None:
        raise SystemExit("--task video needs --val-dir or --data with a val/ folder")
    val = video_eval_dataset(val_src, spec, detect, list_file=args.val_list, one_based=args.one_based)
    return train, val, counts


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
