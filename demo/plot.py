"""A video's timeline as a PNG: one line per emotion over the windows (matplotlib, no pyplot state)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .palette import color_of


def timeline_png(path: Path, windows: Sequence[tuple[float, float]], probs: Sequence[Sequence[float]],
                 labels: Sequence[str], duration: float, title: str) -> None:
    """Plot ``probs`` (one row of per-label probabilities per window) at the windows' middles;
    a video of one window gets one point per label over its middle."""
    fig = Figure(figsize=(8, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    mids = [(s + e) / 2 for s, e in windows]
    for j, label in enumerate(labels):
        ax.plot(mids, [row[j] for row in probs], marker="o", markersize=4, linewidth=2,
                color=color_of(label), label=label)
    for s, e in windows:
        ax.axvspan(s, e, color="#1f6feb", alpha=0.03, linewidth=0)
    ax.set_xlim(0, max(duration, 1e-3))
    ax.set_ylim(0, min(1.0, max(0.2, max((max(r) for r in probs), default=0) * 1.15)))
    ax.set_xlabel("time (s): each point is a window's middle")
    ax.set_ylabel("probability")
    ax.set_title(title, fontsize=10)
    ax.grid(True, color="#eeeeee")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
