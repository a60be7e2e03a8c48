"""One colour per emotion label, shared by the demo page (via ``/config.json``) and ``demo.annotate``."""
from __future__ import annotations

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
