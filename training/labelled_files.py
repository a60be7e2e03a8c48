"""Where labelled files come from, for image and clip datasets alike: class folders, list files
(``relative/path label``), CSV files (``file,emotion``), and class names with their variants."""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Callable, Iterable, Sequence

from model_defs import LABELS

log = logging.getLogger(__name__)

_ALIASES = {"anger": "angry", "disgusted": "disgust", "fearful": "fear", "happiness": "happy",
            "sadness": "sad", "surprised": "surprise", "neutrality": "neutral", "contempt": None}

Labelled = tuple[list[Path], list[int]]
"""Paths and their class indices into ``LABELS``."""


def label_index(name: str) -> int | None:
    """Index of a class name in ``LABELS`` (case-insensitive, common variants accepted)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    return LABELS.index(key) if key in LABELS else None


def class_counts(labels: Iterable[int]) -> list[int]:
    """How many items each class of ``LABELS`` has."""
    counts = [0] * len(LABELS)
    for c in labels:
        counts[c] += 1
    return counts


def class_folders(root: str | Path, items: Callable[[Path], Iterable[Path]], what: str) -> Labelled:
    """``root/<class>/...``: per class folder named after ``LABELS`` (missing ones allowed; others
    skipped with a warning), the items ``items(folder)`` lists. ``what`` names them in errors."""
    root, paths, labels = Path(root), [], []
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        idx = label_index(d.name)
        if idx is None:
            log.warning("skipping folder %s: not one of %s", d, ", ".join(LABELS))
            continue
        for item in items(d):
            paths.append(item)
            labels.append(idx)
    if not paths:
        raise ValueError(f"no {what} found under {root} (expected {root}/<class>/<{what}>)")
    return paths, labels


def read_list_file(root: str | Path, list_file: str | Path, one_based: bool = False) -> Labelled:
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


def read_labels_csv(csv_file: str | Path, name_columns: Sequence[str], subfolder: str, what: str) -> Labelled:
    """A CSV with a header: the file in the first of ``name_columns`` present, the class in
    ``emotion`` (or ``label``); paths relative to the CSV's folder or its ``subfolder``. Rows
    without a known emotion are skipped with a warning."""
    csv_file, paths, labels, skipped = Path(csv_file), [], [], {}
    with csv_file.open(newline="") as f:
        for row in csv.DictReader(f):
            name = next((row[c] for c in name_columns if row.get(c)), "")
            emotion = (row.get("emotion") or row.get("label") or "").strip()
            idx = label_index(emotion)
            if not name or idx is None:
                skipped[emotion] = skipped.get(emotion, 0) + 1
                continue
            path = csv_file.parent / name
            if not path.exists() and (csv_file.parent / subfolder / name).exists():
                path = csv_file.parent / subfolder / name
            paths.append(path)
            labels.append(idx)
    if skipped:
        log.warning("%s: skipped rows without a known emotion: %s", csv_file, skipped)
    if not paths:
        raise ValueError(f"{csv_file}: no labelled {what}")
    return paths, labels
