"""A network's pooled features (``forward_features``) for a dataset's faces, with their labels."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .engine import prepare_batch


@torch.no_grad()
def pooled_features(model: nn.Module, ds: Dataset, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, F)`` float features of ``ds``'s faces (the model in eval mode) and their ``(N,)`` labels
    (the dataset's own labels where it has them, not any soft targets it returns)."""
    spec = model.spec.to_dict()
    feats, labels = [], []
    for x, y in DataLoader(ds, batch_size=batch_size):
        feats.append(model.forward_features(prepare_batch(x, spec)).float())
        labels.append(torch.as_tensor(y))
    own = getattr(ds, "labels", None)
    return torch.cat(feats), torch.as_tensor(own) if own is not None else torch.cat(labels)
