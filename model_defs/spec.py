"""Labels and the preprocessing spec that travels with every set of weights."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

LABELS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
"""The seven classes, in this order everywhere (FER2013 / RAF-DB order)."""


@dataclass
class ModelSpec:
    """What a network expects as input and what it outputs.

    Saved beside the weights (and inside the TorchScript file) so that training,
    evaluation and serving cannot drift apart.
    """

    arch: str
    task: str = "image"  # "image" or "video"
    input_size: int = 48  # square side in pixels
    channels: int = 1  # 1 = grayscale, 3 = RGB
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    labels: tuple[str, ...] = LABELS
    clip_len: int = 0  # frames per clip for video models, 0 for image models
    face_margin: float = 0.0  # alignment crop margin (see handlers.faces); 0 = library default
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"], d["labels"] = list(self.mean), list(self.std), list(self.labels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        d = dict(d)
        for key in ("mean", "std", "labels"):
            if key in d:
                d[key] = tuple(d[key])
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def with_channels(spec: ModelSpec, channels: int) -> ModelSpec:
    """``spec`` for grey (1) or colour (3) input; the normalisation is shared by the channels
    (grey's statistics copied to each, or colour's averaged), so that a network whose first layer
    is adapted by :func:`model_defs.checkpoint.adapt_input_channels` answers a grey face alike."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (colour), not {channels}")
    if channels == spec.channels:
        return spec
    mean, std = sum(spec.mean) / len(spec.mean), sum(spec.std) / len(spec.std)
    return replace(spec, channels=channels, mean=(mean,) * channels, std=(std,) * channels)
