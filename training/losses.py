"""Losses: soft-target cross-entropy and the DLP-CNN locality-preserving loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def target_distribution(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Targets as ``(N, K)`` distributions: class indices become one-hot, soft targets stay."""
    return y.float() if y.dim() == 2 else F.one_hot(y, num_classes).float()


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0,
                       class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy against soft targets (mixup/cutmix), with label smoothing and class weights."""
    n_cls = logits.shape[-1]
    if smoothing > 0:
        target = target * (1 - smoothing) + smoothing / n_cls
    loss = -(target * F.log_softmax(logits.float(), dim=-1))
    if class_weights is not None:
        loss = loss * class_weights
    return loss.sum(-1).mean()


def locality_preserving_loss(features: torch.Tensor, labels: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Li et al. (CVPR 2017): pull each feature toward the mean of its k nearest same-class
    neighbours in the batch. Samples with no same-class neighbour contribute nothing."""
    f = features.float()
    dist = torch.cdist(f, f)
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    dist = dist.masked_fill(~same, float("inf"))
    kk = min(k, f.shape[0] - 1)
    if kk < 1:
        return f.new_zeros(())
    d, idx = dist.topk(kk, dim=1, largest=False)
    valid = torch.isfinite(d).float()  # (N, k)
    count = valid.sum(1)
    centre = (f[idx] * valid[..., None]).sum(1) / count.clamp(min=1)[:, None]
    has = count > 0
    if not has.any():
        return f.new_zeros(())
    return 0.5 * ((f - centre.detach()) ** 2).sum(1)[has].mean()
