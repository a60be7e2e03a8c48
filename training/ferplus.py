"""FER+ crowd votes (Barsoum et al. 2016) for FER2013 images: soft targets and majority labels.

``ferplus_votes.csv`` has a ``file`` column (``train/angry/fer0000000.png``) and ten vote columns
``neutral happiness surprise sadness anger disgust fear contempt unknown NF``. Images are matched
by file name (``ferNNNNNNN.png`` is the row of the original ``fer2013.csv``, unique over splits).
"""
from __future__ import annotations

import copy
import csv
from pathlib import Path
from typing import Any, Sequence

import torch

from model_defs import LABELS

VOTE_COLUMNS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                "contempt", "unknown", "NF")
_TO_LABEL = {"anger": "angry", "disgust": "disgust", "fear": "fear", "happiness": "happy",
             "neutral": "neutral", "sadness": "sad", "surprise": "surprise"}
"""FER+ column → our label; contempt, unknown and NF have none."""


def read_votes(csv_file: str | Path) -> dict[str, list[int]]:
    """File name → the ten vote counts, in ``VOTE_COLUMNS`` order."""
    with Path(csv_file).open(newline="") as f:
        return {Path(row["file"]).name: [int(row[c] or 0) for c in VOTE_COLUMNS] for row in csv.DictReader(f)}


def vote_distribution(votes: Sequence[int]) -> torch.Tensor | None:
    """Votes for the seven ``LABELS``, normalised to sum 1; None when none of the ten voted for them."""
    dist = torch.zeros(len(LABELS))
    for col, n in zip(VOTE_COLUMNS, votes):
        if col in _TO_LABEL:
            dist[LABELS.index(_TO_LABEL[col])] += n
    return dist / dist.sum() if dist.sum() > 0 else None


def majority_label(votes: Sequence[int]) -> int | None:
    """The FER+ majority as a ``LABELS`` index; None for ties and for a majority of contempt,
    unknown or not-a-face (those images are dropped from a FER+ evaluation)."""
    top = max(votes)
    winners = [c for c, n in zip(VOTE_COLUMNS, votes) if n == top]
    if top == 0 or len(winners) != 1 or winners[0] not in _TO_LABEL:
        return None
    return LABELS.index(_TO_LABEL[winners[0]])


def soft_targets(files: Sequence[str | Path], labels: Sequence[int], votes: dict[str, list[int]],
                 label_weight: float) -> torch.Tensor:
    """Per-image targets ``label_weight * one_hot(folder label) + (1 - label_weight) * FER+ votes``;
    images without usable votes keep their one-hot label. ``(N, 7)`` float."""
    out = torch.nn.functional.one_hot(torch.as_tensor(list(labels)), len(LABELS)).float()
    for i, f in enumerate(files):
        dist = vote_distribution(votes[Path(f).name]) if Path(f).name in votes else None
        if dist is not None:
            out[i] = label_weight * out[i] + (1 - label_weight) * dist
    return out


def with_ferplus_majority(ds: Any, votes: dict[str, list[int]]) -> Any:
    """A copy of an image dataset (``files``/``labels``) relabelled with the FER+ majority,
    keeping only the images that have one (see :func:`majority_label`)."""
    keep = [(f, majority_label(votes[Path(f).name])) for f in ds.files if Path(f).name in votes]
    keep = [(f, m) for f, m in keep if m is not None]
    if not keep:
        raise ValueError("no image of the dataset has a FER+ majority label (file names must match ferplus_votes.csv)")
    out = copy.copy(ds)
    out.files, out.labels = [f for f, _ in keep], [m for _, m in keep]
    out.targets = None
    return out
