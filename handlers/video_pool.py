"""Pooling per-frame emotion probabilities into one answer for a clip (or a timeline window).

Acted and real clips start and end near neutral and show the expression in between, so a plain
mean over the frames votes for neutral. The options (``POOLINGS``), each over ``(T, K)`` frame
probabilities in the model's label order:

* ``mean``: the plain mean (the per-frame baseline).
* ``confidence``: a weighted mean; each frame weighs its largest non-neutral probability to the
  power ``gamma``, so frames that are sure of an expression count more.
* ``window``: the mean over the most expressive stretch of ``window`` (a fraction of the frames):
  the one with the least neutral probability on average.
* ``peak``: the mean of the ``window`` fraction of frames with the least neutral probability,
  wherever they are.

A truly neutral clip stays neutral under all of them: its frames are neutral everywhere.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

POOLINGS = ("mean", "confidence", "window", "peak")
DEFAULT_POOLING = "mean"
DEFAULT_PARAMS: dict[str, float] = {"gamma": 2.0, "window": 0.4}
NEUTRAL = "neutral"


def pooling_from_spec(spec: Mapping[str, Any]) -> tuple[str, dict[str, float]]:
    """The pooling a spec asks for (``extra.pooling``, ``extra.pooling_params``) with defaults filled in."""
    extra = spec.get("extra") or {}
    method = str(extra.get("pooling") or DEFAULT_POOLING)
    check_pooling(method)
    return method, {**DEFAULT_PARAMS, **{k: float(v) for k, v in (extra.get("pooling_params") or {}).items()}}


def check_pooling(method: str) -> None:
    """Raise ``ValueError`` for a pooling that does not exist."""
    if method not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {method!r}")


def pool(probs: torch.Tensor, labels: Sequence[str], method: str = DEFAULT_POOLING,
         params: Mapping[str, float] | None = None) -> torch.Tensor:
    """``(T, K)`` frame probabilities → ``(K,)`` clip probabilities (sums to 1)."""
    check_pooling(method)
    if probs.dim() != 2 or probs.shape[0] == 0:
        raise ValueError(f"expected (T, K) frame probabilities with T > 0, got {tuple(probs.shape)}")
    p = {**DEFAULT_PARAMS, **(params or {})}
    probs = probs.float()
    if method == "mean" or probs.shape[0] == 1:
        return probs.mean(0)
    neutral = list(labels).index(NEUTRAL) if NEUTRAL in labels else None
    expressive = 1.0 - probs[:, neutral] if neutral is not None else probs.max(1).values
    if method == "confidence":
        others = probs.clone()
        if neutral is not None:
            others[:, neutral] = 0.0
        w = others.max(1).values.clamp_min(1e-6) ** float(p["gamma"])
        return (w[:, None] * probs).sum(0) / w.sum()
    n = probs.shape[0]
    k = min(n, max(1, int(math.ceil(float(p["window"]) * n))))
    if method == "peak":
        idx = expressive.topk(k).indices
        return probs[idx].mean(0)
    # window: the contiguous run of k frames with the most expression on average
    run = expressive.unfold(0, k, 1).mean(1)
    start = int(run.argmax())
    return probs[start:start + k].mean(0)
