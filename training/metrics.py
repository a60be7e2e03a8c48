"""Classification and calibration metrics, and their figures (confusion matrix, reliability diagram).

Class names come from the model's spec (``spec["labels"]``), never from a copy of the list.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

ECE_BINS = 15


def confusion_matrix(probs: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` x ``k`` counts, rows = truth, columns = top-1 answer."""
    return torch.bincount(labels * k + probs.argmax(-1), minlength=k * k).view(k, k)


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, names: Sequence[str]) -> dict[str, Any]:
    """acc, acc_top3, n, per-class recall, confusion matrix and ECE of ``(N, K)`` probabilities."""
    k, n = len(names), len(labels)
    conf = confusion_matrix(probs, labels, k)
    top3 = int((probs.topk(min(3, k), -1).indices == labels[:, None]).any(1).sum()) if n else 0
    per_class = {names[i]: (float(conf[i, i] / conf[i].sum()) if conf[i].sum() else None) for i in range(k)}
    return {"acc": float(conf.diag().sum() / max(n, 1)), "acc_top3": top3 / max(n, 1), "n": n,
            "per_class": per_class, "confusion": conf.tolist(), "labels": list(names),
            "ece": expected_calibration_error(probs, labels) if n else 0.0}


def calibration_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Equal-width confidence bins: count, mean confidence and accuracy of the top-1 answers."""
    conf, pred = probs.max(-1)
    hit = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    out = []
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
        sel = (conf > lo) & (conf <= hi)
        n = int(sel.sum())
        out.append({"lo": lo, "hi": hi, "n": n, "confidence": float(conf[sel].mean()) if n else 0.0,
                    "accuracy": float(hit[sel].mean()) if n else 0.0})
    return out


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean gap between confidence and accuracy over ``bins`` bins."""
    total = max(len(labels), 1)
    return sum(b["n"] / total * abs(b["accuracy"] - b["confidence"]) for b in calibration_bins(probs, labels, bins))


def _pyplot():
    import matplotlib  # plotting: only when a figure is asked for
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def confusion_figure(conf: list[list[int]], names: Sequence[str], title: str = "confusion matrix (rows: truth)"):
    """A matplotlib figure of a row-normalized confusion matrix."""
    plt = _pyplot()
    c = torch.tensor(conf, dtype=torch.float32)
    norm = c / c.sum(1, keepdim=True).clamp(min=1)
    k = len(names)
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def reliability_figure(before: list[dict[str, float]], after: list[dict[str, float]], title: str):
    """Reliability diagram: accuracy against confidence per bin, before and after calibration."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    for ax, bins, name in zip(axes, (before, after), ("before calibration", "after calibration")):
        centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
        width = (bins[0]["hi"] - bins[0]["lo"]) * 0.95
        acc = [b["accuracy"] for b in bins]
        ax.bar(centres, acc, width=width, color="tab:blue", label="accuracy")
        ax.bar(centres, [b["confidence"] - a if b["n"] else 0 for b, a in zip(bins, acc)], bottom=acc,
               width=width, color="tab:red", alpha=0.35, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlabel("confidence (top-1 probability)")
        ax.set_title(name)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
