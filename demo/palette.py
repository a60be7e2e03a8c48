"""One colour per emotion label, and the colours of the "why" maps, shared by the demo page (via
``/config.json``) and ``demo.annotate``."""
from __future__ import annotations

import numpy as np

from model_defs import LABELS

LABEL_COLORS: dict[str, str] = dict(zip(LABELS, (
    "#d62728",  # angry: red
    "#2ca02c",  # disgust: green
    "#9467bd",  # fear: purple
    "#ff9f1c",  # happy: orange
    "#7f7f7f",  # neutral: grey
    "#1f77b4",  # sad: blue
    "#e377c2",  # surprise: pink
)))


def color_of(label: str) -> str:
    """The label's colour (white for a label the palette does not know)."""
    return LABEL_COLORS.get(label, "#ffffff")


WHY_FLOOR = 0.2
"""Map values (``handlers/explain.py``: [0, 1] per cell) below this are not drawn."""
WHY_ALPHA = 215
"""Opacity of a map's hottest cell (of 255)."""


def heat(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] → RGBA ``uint8`` (one more axis): transparent below WHY_FLOOR, then
    yellow to opaque red (the page's ``heat`` in app.js draws the same from /config.json)."""
    v = np.clip(np.asarray(values, np.float64), 0.0, 1.0)
    alpha = WHY_ALPHA * np.clip((v - WHY_FLOOR) / (1 - WHY_FLOOR), 0.0, 1.0)
    rgba = np.stack([np.full_like(v, 255.0), 225 * (1 - v), 40 * (1 - v), alpha], axis=-1)
    return np.round(rgba).astype(np.uint8)
