"""Boxes, labels and top-3 bars drawn on pictures (PIL), in the demo page's colours."""
from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from .palette import color_of

PANEL_WIDTH = 300  # the photo's side panel of top-3 bars
PANEL_BG = (250, 250, 250)
TEXT = (29, 29, 31)
TRACK = (230, 230, 230)

Top = Sequence[tuple[str, float]]  # (label, probability), most probable first


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` pixels (no system fonts needed)."""
    return ImageFont.load_default(size=size)


def label_text(top: Top, prefix: str = "") -> str:
    label, p = top[0]
    return f"{prefix}{label} {100 * p:.1f}%"


def draw_box(img: Image.Image, box: Sequence[float], text: str, color: str) -> None:
    """A box in ``color`` with ``text`` on a filled tab above it (inside it at the top edge)."""
    d = ImageDraw.Draw(img)
    scale = max(img.size) / 640
    width = max(2, round(2 * scale))
    f = font(max(11, round(13 * scale)))
    x1, y1, x2, y2 = (float(v) for v in box)
    d.rectangle([x1, y1, x2, y2], outline=color, width=width)
    if not text:
        return
    l, t, r, b = d.textbbox((0, 0), text, font=f)
    tw, th = r - l + 2 * width + 4, b - t + 2 * width + 2
    ty = y1 - th if y1 - th >= 0 else y1
    tx = max(0.0, min(x1, img.width - tw))  # keep the tab inside the picture
    d.rectangle([tx, ty, tx + tw, ty + th], fill=color)
    d.text((tx + width + 2 - l, ty + width - t + 1), text, font=f, fill="white")


def draw_banner(img: Image.Image, text: str, color: str) -> None:
    """A label in the top-left corner (a video with no face: the whole frame was classified)."""
    d = ImageDraw.Draw(img)
    f = font(max(11, round(13 * max(img.size) / 640)))
    l, t, r, b = d.textbbox((0, 0), text, font=f)
    d.rectangle([0, 0, r - l + 8, b - t + 6], fill=color)
    d.text((4 - l, 3 - t), text, font=f, fill="white")


def photo_panel(height: int, tops: Sequence[Top], titles: Sequence[str]) -> Image.Image:
    """A side panel: per face its title and top-3 bars with the probabilities written out."""
    panel = Image.new("RGB", (PANEL_WIDTH, max(height, 40 + 86 * len(tops))), PANEL_BG)
    d = ImageDraw.Draw(panel)
    title_font, row_font = font(15), font(13)
    y = 10
    for title, top in zip(titles, tops):
        d.text((12, y), title, font=title_font, fill=TEXT)
        y += 22
        for label, p in top:
            d.text((12, y), label, font=row_font, fill=TEXT)
            d.rectangle([84, y + 2, 224, y + 14], fill=TRACK)
            d.rectangle([84, y + 2, 84 + round(140 * max(0.0, min(1.0, p))), y + 14], fill=color_of(label))
            d.text((232, y), f"{100 * p:.1f}%", font=row_font, fill=TEXT)
            y += 18
        y += 10
    return panel


def annotate_photo(img: Image.Image, boxes: Sequence[Sequence[float]], tops: Sequence[Top],
                   detected: Sequence[bool]) -> Image.Image:
    """The photo with a numbered box and top label per face, and the top-3 bars beside it."""
    out = img.convert("RGB").copy()
    titles = []
    for i, (box, top, det) in enumerate(zip(boxes, tops, detected)):
        draw_box(out, box, label_text(top, f"{i + 1} "), color_of(top[0][0]))
        titles.append(f"{i + 1}. face {i + 1}" if det else f"{i + 1}. the whole image")
    panel = photo_panel(out.height, tops, titles)
    canvas = Image.new("RGB", (out.width + panel.width, max(out.height, panel.height)), PANEL_BG)
    canvas.paste(out, (0, 0))
    canvas.paste(panel, (out.width, 0))
    return canvas
