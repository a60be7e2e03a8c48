"""The seed SDK's names and quirks, for code written against it: ``Emotion_Recognize``.

    from training import Emotion_Recognize
    model = Emotion_Recognize(Video=False, pretrain=True, nGPU=0)
    model.train(train_loader, test_loader, 10, learn_rate=3e-5, weight_deacy=5e-4)

On top of :class:`training.sdk.EmotionRecognizer` it keeps:

* the seed's argument names ``Video``, ``pretrain``, ``nGPU`` and ``weight_deacy``;
* the seed's weights folder: ``<weights_dir>/origin_pic_model.pth`` / ``origin_video_model.pth``
  (default ``pretrain/``) is loaded first when present, and the best epoch is saved as
  ``best_pic_model.pth`` / ``best_video_model.pth``: in ``<log_dir>/<task>/`` (``runs/sdk``), or
  in ``weights_dir`` when you pass one;
* the seed's clip layout: its ``AFEWTrainSet`` stacks grey frames ``(T, 3, H, W)`` and reshapes
  (not permutes) them to ``(3, T, H, W)``; such clips are put back in frame order;
* RAF-DB's label numbering as :data:`RAF_DB_ORDER` (pass it as ``target_order``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from model_defs import SHIPPED_WEIGHTS

from .sdk import EmotionRecognizer

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS_DIR = SHIPPED_WEIGHTS["image"].parent
"""The seed's ``pretrain/`` folder, where ``origin_*`` weights are looked for."""
ORIGIN = {"image": "origin_pic_model.pth", "video": "origin_video_model.pth"}
BEST = {"image": "best_pic_model.pth", "video": "best_video_model.pth"}

RAF_DB_ORDER: tuple[str, ...] = ("surprise", "fear", "disgust", "happy", "sad", "angry", "neutral")
"""RAF-DB's own numbering (its list files say 1-7 in this order; the seed subtracts 1)."""


class Emotion_Recognize(EmotionRecognizer):  # noqa: N801  (the seed's name)
    """:class:`training.sdk.EmotionRecognizer` with the seed's names, weights folder and clip layout.

    Args (besides EmotionRecognizer's ``model``, ``target_order``, ``face_detection``):
        Video / video: clips (True, the default) or still images.
        pretrain / pretrained: start from ``<weights_dir>/origin_*.pth``, else the shipped weights.
        nGPU / n_gpu: as ``n_gpu``.
        weights_dir: the seed's ``pretrain/`` folder (read ``origin_*``; written ``best_*`` when given).
        log_dir: TensorBoard logs and, without ``weights_dir``, the best weights (default ``runs/sdk``).
    """

    def __init__(self, Video: bool | None = None, pretrain: bool | None = None, nGPU: int | None = None, *,  # noqa: N803
                 video: bool | None = None, pretrained: bool | None = None, n_gpu: int | None = None,
                 weights_dir: str | os.PathLike | None = None, model: str | None = None,
                 log_dir: str | os.PathLike | None = None, target_order: Sequence[str] | None = None,
                 face_detection: str = "auto") -> None:
        video = _alias("video", video, "Video", Video, True)
        pretrained = bool(_alias("pretrained", pretrained, "pretrain", pretrain, True))
        n_gpu = int(_alias("n_gpu", n_gpu, "nGPU", nGPU, 0))
        task = "video" if video else "image"
        self.weights_dir = Path(weights_dir) if weights_dir is not None else Path(DEFAULT_WEIGHTS_DIR)
        origin = self.weights_dir / ORIGIN[task]
        weights = origin if pretrained and origin.is_file() else None
        self.best_name = BEST[task]
        super().__init__(video, pretrained, n_gpu, model=model, weights=weights, output_dir=log_dir,
                         target_order=target_order, face_detection=face_detection)
        if weights_dir is not None:  # the seed wrote best_* beside its origin_* weights
            self.best_name = str((self.weights_dir / BEST[task]).resolve())

    def train(self, train_loader: Any, test_loader: Any, epochs: int, learn_rate: float = 3e-5,
              momentum: float = 0.9, weight_decay: float = 5e-4, *, weight_deacy: float | None = None
              ) -> dict[str, Any]:
        """:meth:`EmotionRecognizer.train`; ``weight_deacy`` is the seed README's spelling."""
        return super().train(train_loader, test_loader, epochs, learn_rate, momentum,
                             weight_decay if weight_deacy is None else weight_deacy)

    def to_spec_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`EmotionRecognizer.to_spec_uint8`, after putting seed-layout clips in frame order."""
        return super().to_spec_uint8(unscramble_seed_clips(x) if x.dim() == 5 else x)


def unscramble_seed_clips(x: torch.Tensor) -> torch.Tensor:
    """Undo the seed's ``video.reshape(C, D, H, W)`` of stacked ``(D, C, H, W)`` grey frames.

    The seed's frames are grey copies in three channels, so read back as ``(D, 3, H, W)`` such a
    clip has three equal channels; a clip in true ``(3, D, H, W)`` order has that property only
    when all its frames are equal, and then both readings are the same clip.
    """
    if x.shape[1] != 3:
        return x
    n, c, t, h, w = x.shape
    out = x
    for i in range(n):
        frames = x[i].reshape(t, c, h, w)
        if torch.equal(frames[:, 0], frames[:, 1]) and torch.equal(frames[:, 0], frames[:, 2]):
            out = x.clone() if out is x else out
            out[i] = frames.transpose(0, 1)
    return out


def _alias(name: str, value: Any, seed_name: str, seed_value: Any, default: Any) -> Any:
    if value is not None and seed_value is not None and value != seed_value:
        raise TypeError(f"{name}={value!r} and {seed_name}={seed_value!r} disagree; pass one of them")
    return next((v for v in (value, seed_value) if v is not None), default)
