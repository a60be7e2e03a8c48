"""Real face crops for explanation tests and ``bench/bench_explain.py``: the FER2013 crops of
``tests/fixtures/faces`` and ``faces_regression`` (classified whole, as served) and the aligned
faces of the group photo, each as the model's normalized input."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from PIL import Image

from handlers import faces, preprocess

FIXTURES = Path(__file__).parent / "fixtures"
CROP_DIRS = (FIXTURES / "faces", FIXTURES / "faces_regression")
GROUP = FIXTURES / "photos" / "group.jpg"


def crop_files() -> list[Path]:
    """The FER2013 face crops of the fixtures (56: 14 + 42)."""
    return sorted(p for d in CROP_DIRS for p in d.glob("*/*.jpg"))


def fixture_inputs(spec: Mapping[str, Any], detector: faces.FaceDetector | None = None,
                   limit: int | None = None) -> torch.Tensor:
    """``(N, C, S, S)`` normalized crops: the fixture crops, then (with a detector) the group
    photo's aligned faces."""
    size, channels, margin = int(spec["input_size"]), int(spec["channels"]), spec.get("face_margin")
    images = [Image.open(p).convert("RGB") for p in crop_files()[:limit]]
    if detector is not None:
        images.append(Image.open(GROUP).convert("RGB"))
    crops = [c for per in faces.faces_for_images(images, detector, "auto" if detector else "never",
                                                 size, margin, channels) for c in per]
    return torch.stack([preprocess.to_model_input(c.image, spec) for c in crops])
