"""Image datasets: an ImageFolder tree and the seed's list file (RAF-DB style).

Items are ``(uint8 tensor (C, S, S), label)``: decoding and resizing go through
``handlers.preprocess`` exactly as in serving; normalization and augmentation happen
batched on the training device (see ``training.augment``).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset

from handlers.contract import IMAGE_DEFAULTS, DetectionMode
from handlers.faces import detector_for, largest_face
from handlers.preprocess import decode_image, to_uint8
from model_defs import LABELS

from .labelled_files import class_counts, class_folders, read_labels_csv, read_list_file


IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
FaceCropFn = Callable[[Image.Image], Image.Image]
"""Maps a decoded RGB PIL image to the face image to classify (identity, or detect+align)."""


def detected_face_crop(spec: Mapping[str, Any], device: str = "cpu", mode: DetectionMode = "auto",
                       min_face_size: int = 20, detector_name: str = str(IMAGE_DEFAULTS["detector"])) -> FaceCropFn:
    """The handler's detect-and-align step as a PIL → PIL function: ``handlers.faces.largest_face``
    with the spec's size, margin and channels (the whole image when no face is found), the faces
    found by ``detector_name`` (the served default unless given)."""
    options = {**IMAGE_DEFAULTS, "detector": detector_name, "min_face_size": min_face_size}
    detector = detector_for(options, device) if mode != "never" else None
    args = (int(spec["input_size"]), spec.get("face_margin"), int(spec["channels"]))
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
        return class_counts(self.labels)

    def target_rows(self) -> torch.Tensor:
        """``(N, K)`` float targets, a new tensor: the soft ones where set, else the labels one-hot."""
        if self.targets is not None:
            return self.targets.float().clone()
        return torch.nn.functional.one_hot(torch.as_tensor(self.labels), len(LABELS)).float()


class ImageFolderDataset(_EncodedImages):
    """``root/<class>/<image>``; class folders named after ``LABELS`` (missing ones allowed)."""

    def __init__(self, root: str | Path, spec: Mapping[str, Any], face_crop: FaceCropFn | None = None) -> None:
        files, labels = class_folders(root, _images_below, "image")
        super().__init__(files, labels, spec, face_crop)
        self.root = Path(root)


def _images_below(folder: Path) -> list[Path]:
    return [f for f in sorted(folder.rglob("*")) if f.suffix.lower() in IMAGE_EXTS and f.is_file()]


def random_subset(ds: Dataset, labels: Sequence[int], n: int, seed: int = 0) -> tuple[Dataset, list[int]]:
    """``n`` random items of ``ds`` (whose labels are ``labels``) and their class counts."""
    idx = random.Random(seed).sample(range(len(labels)), min(n, len(labels)))
    return Subset(ds, idx), class_counts(labels[i] for i in idx)


class ListFileDataset(_EncodedImages):
    """The seed's list file: ``relative/path label`` per line (labels 0-6, or 1-7 with ``one_based``)."""

    def __init__(self, root: str | Path, list_file: str | Path, spec: Mapping[str, Any],
                 one_based: bool = False, face_crop: FaceCropFn | None = None) -> None:
        files, labels = read_list_file(root, list_file, one_based)
        super().__init__(files, labels, spec, face_crop)


def cache_in_memory(ds: Dataset, workers: int = 0) -> TensorDataset:
    """Decode a whole dataset once into a uint8 tensor (FER2013 train is 66 MB); every field of
    its items (image, label or target, source index) is kept."""
    loader = torch.utils.data.DataLoader(ds, batch_size=512, num_workers=workers)
    columns = zip(*loader)
    return TensorDataset(*(torch.cat(c) for c in columns))


class CsvImageDataset(_EncodedImages):
    """A flat folder of images with a CSV (``image,emotion`` header; other columns ignored).

    Paths in the CSV are relative to the CSV's folder or to its ``images/`` sub-folder.
    Rows whose emotion is not one of ``LABELS`` are skipped with a warning.
    """

    def __init__(self, csv_file: str | Path, spec: Mapping[str, Any], face_crop: FaceCropFn | None = None) -> None:
        files, labels = read_labels_csv(csv_file, ("image", "file", "path"), "images", "images")
        super().__init__(files, labels, spec, face_crop)


def image_dataset(path: str | Path, spec: Mapping[str, Any], face_crop: FaceCropFn | None = None) -> _EncodedImages:
    """An ImageFolder tree, or a folder/CSV file with ``labels.csv``-style labels."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return CsvImageDataset(path, spec, face_crop)
    if (path / "labels.csv").is_file():
        return CsvImageDataset(path / "labels.csv", spec, face_crop)
    return ImageFolderDataset(path, spec, face_crop)
