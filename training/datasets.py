"""Image datasets: an ImageFolder tree and the seed's list file (RAF-DB style).

Items are ``(uint8 tensor (C, S, S), label)``: decoding and resizing go through
``handlers.preprocess`` exactly as in serving; normalization and augmentation happen
batched on the training device (see ``training.augment``).
"""
from __future__ import annotations

import csv
import logging
import random
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset

from handlers.contract import DetectionMode
from handlers.faces import DEFAULT_MARGIN, FaceDetector, largest_face
from handlers.preprocess import decode_image, to_uint8
from model_defs import LABELS

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
_ALIASES = {"anger": "angry", "disgusted": "disgust", "fearful": "fear", "happiness": "happy",
            "sadness": "sad", "surprised": "surprise", "neutrality": "neutral", "contempt": None}


def label_index(name: str) -> int | None:
    """Index of a class name in ``LABELS`` (case-insensitive, common variants accepted)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    return LABELS.index(key) if key in LABELS else None


FaceCropFn = Callable[[Image.Image], Image.Image]
"""Maps a decoded RGB PIL image to the face image to classify (identity, or detect+align)."""


def detected_face_crop(spec: Mapping[str, Any], device: str = "cpu", mode: DetectionMode = "auto",
                       min_face_size: int = 20) -> FaceCropFn:
    """The handler's detect-and-align step as a PIL → PIL function: ``handlers.faces.largest_face``
    with the spec's size, margin and channels (the whole image when no face is found)."""
    detector = FaceDetector(device=device, min_face_size=min_face_size) if mode != "never" else None
    args = (int(spec["input_size"]), float(spec.get("face_margin") or 0.0) or DEFAULT_MARGIN, int(spec["channels"]))
    return lambda img: largest_face(img, detector, mode, *args).image


class _EncodedImages(Dataset):
    """Shared item loading: read file → decode → (optional face crop) → resize to the spec."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], spec: Mapping[str, Any],
                 face_crop: FaceCropFn | None = None) -> None:
        self.files, self.labels = list(files), list(labels)
        self.spec, self.face_crop = dict(spec), face_crop
        self.targets: torch.Tensor | None = None  # (N, K) soft targets to return instead of labels


    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        img = decode_image(Path(self.files[i]).read_bytes())
        if self.face_crop is not None:
            img = self.face_crop(img)
        return to_uint8(img, self.spec), (self.labels[i] if self.targets is None else self.targets[i])

    def class_counts(self) -> list[int]:
        return [self.labels.count(c) for c in range(len(LABELS))]


class ImageFolderDataset(_EncodedImages):
    """``root/<class>/<image>``; class folders named after ``LABELS`` (missing ones allowed)."""

    def __init__(self, root: str | Path, spec: Mapping[str, Any], face_crop: FaceCropFn | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {root}")
        files, labels = [], []
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            idx = label_index(d.name)
            if idx is None:
                log.warning("skipping folder %s: not one of %s", d, ", ".join(LABELS))
                continue
            for f in sorted(d.rglob("*")):
                if f.suffix.lower() in IMAGE_EXTS and f.is_file():
                    files.append(f)
                    labels.append(idx)
        if not files:
            raise ValueError(f"no images found under {root} (expected {root}/<class>/<image>)")
        super().__init__(files, labels, spec, face_crop)


def read_list_file(root: str | Path, list_file: str | Path, one_based: bool = False) -> tuple[list[Path], list[int]]:
    """``relative/path label`` lines (labels 0-6, or 1-7 with ``one_based``; ``#`` comments) →
    paths under ``root`` and label indices."""
    root, paths, labels = Path(root), [], []
    for n, line in enumerate(Path(list_file).read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            rel, lab = line.rsplit(maxsplit=1)
            idx = int(lab) - (1 if one_based else 0)
        except ValueError as e:
            raise ValueError(f"{list_file}:{n}: expected 'relative/path label', got {line!r}") from e
        if not 0 <= idx < len(LABELS):
            hint = " (labels 1-7? pass one_based / --one-based)" if idx == len(LABELS) else ""
            raise ValueError(f"{list_file}:{n}: label {lab} out of range{hint}")
        paths.append(root / rel)
        labels.append(idx)
    return paths, labels


def random_subset(ds: Dataset, labels: Sequence[int], n: int, seed: int = 0) -> tuple[Dataset, list[int]]:
    """``n`` random items of ``ds`` (whose labels are ``labels``) and their class counts."""
    idx = random.Random(seed).sample(range(len(labels)), min(n, len(labels)))
    counts = [0] * len(LABELS)
    for i in idx:
        counts[labels[i]] += 1
    return Subset(ds, idx), counts


class ListFileDataset(_EncodedImages):
    """The seed's list file: ``relative/path label`` per line (labels 0-6, or 1-7 with ``one_based``)."""

    def __init__(self, root: str | Path, list_file: str | Path, spec: Mapping[str, Any],
                 one_based: bool = False, face_crop: FaceCropFn | None = None) -> None:
        files, labels = read_list_file(root, list_file, one_based)
        super().__init__(files, labels, spec, face_crop)


def cache_in_memory(ds: Dataset, workers: int = 0) -> TensorDataset:
    """Decode a whole dataset once into a uint8 tensor (FER2013 train is 66 MB)."""
    loader = torch.utils.data.DataLoader(ds, batch_size=512, num_workers=workers)
    xs, ys = zip(*[(x, y) for x, y in loader])
    return TensorDataset(torch.cat(xs), torch.cat(ys))


class CsvImageDataset(_EncodedImages):
    """A flat folder of images with a CSV (``image,emotion`` header; other columns ignored).

    Paths in the CSV are relative to the CSV's folder or to its ``images/`` sub-folder.
    Rows whose emotion is not one of ``LABELS`` are skipped with a warning.
    """

    def __init__(self, csv_file: str | Path, spec: Mapping[str, Any], face_crop: FaceCropFn | None = None) -> None:
        csv_file = Path(csv_file)
        files, labels, skipped = [], [], 0
        with csv_file.open(newline="") as f:
            for row in csv.DictReader(f):
                name = row.get("image") or row.get("file") or row.get("path")
                idx = label_index(row.get("emotion") or row.get("label") or "")
                if not name or idx is None:
                    skipped += 1
                    continue
                path = csv_file.parent / name
                if not path.exists() and (csv_file.parent / "images" / name).exists():
                    path = csv_file.parent / "images" / name
                files.append(path)
                labels.append(idx)
        if skipped:
            log.warning("%s: skipped %d rows without a known emotion", csv_file, skipped)
        if not files:
            raise ValueError(f"{csv_file}: no labelled images")
        super().__init__(files, labels, spec, face_crop)


def image_dataset(path: str | Path, spec: Mapping[str, Any], face_crop: FaceCropFn | None = None) -> _EncodedImages:
    """An ImageFolder tree, or a folder/CSV file with ``labels.csv``-style labels."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return CsvImageDataset(path, spec, face_crop)
    if (path / "labels.csv").is_file():
        return CsvImageDataset(path / "labels.csv", spec, face_crop)
    return ImageFolderDataset(path, spec, face_crop)
