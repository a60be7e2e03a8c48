"""Boxes, labels and top-3 bars drawn on pictures (PIL), in the demo page's colours."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from handlers.explain import upsample

from .palette import color_of, heat

PANEL_WIDTH = 300  # the photo's side panel of top-3 bars
PANEL_BG = (250, 250, 250)
TEXT = (29, 29, 31)
TRACK = (230, 230, 230)

THUMB = 96  # a face crop with its map, in the side panel
MAP_SIDE = 256  # a map is smoothed to this many pixels per side before it is warped onto the photo

Top = Sequence[tuple[str, float]]  # (label, probability), most probable first
Why = tuple[torch.Tensor, Sequence[Sequence[float]], Image.Image]  # map, crop corners, the crop itself


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` pixels (no system fonts needed)."""
    return ImageFont.load_default(size=size)


def label_text(top: Top, prefix: str = "") -> str:
    label, p = top[0]
    return f"{prefix}{label} {100 * p:.1f}%"


Rect = tuple[float, float, float, float]  # left, top, right, bottom


def _overlaps(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_tab(box: Rect, size: tuple[float, float], frame: tuple[int, int], taken: Sequence[Rect] = (),
              others: Sequence[Rect] = ()) -> Rect:
    """Where a label tab of ``size`` (w, h) goes for ``box``: above it (inside it at the top edge
    when there is no room above), else the first spot among below it, inside it and further up
    that covers none of the ``taken`` tabs, nor, where one can, the ``others`` boxes (the other
    faces); always inside the ``frame`` (w, h)."""
    (x1, y1, _, y2), (tw, th) = box, size
    tx = max(0.0, min(x1, frame[0] - tw))
    first = y1 - th if y1 - th >= 0 else y1
    spots = [(tx, ty, tx + tw, ty + th) for ty in [first, y2, y1] + [y1 - th * k for k in range(2, 5)]
             if 0 <= ty <= frame[1] - th]
    for avoid in (list(taken) + list(others), taken):
        free = [r for r in spots if not any(_overlaps(r, a) for a in avoid)]
        if free:
            return free[0]
    return (tx, first, tx + tw, first + th)


def draw_box(img: Image.Image, box: Sequence[float], text: str, color: str, taken: list[Rect] | None = None,
             others: Sequence[Sequence[float]] = ()) -> None:
    """A box in ``color`` with ``text`` on a filled tab above it (see :func:`place_tab`). A list
    ``taken``, shared by the boxes of one picture, keeps their tabs off one another (each tab
    placed is added to it); ``others``, the picture's other boxes, off their faces where it can."""
    d = ImageDraw.Draw(img)
    scale = max(img.size) / 640
    width = max(2, round(2 * scale))
    f = font(max(11, round(13 * scale)))
    x1, y1, x2, y2 = (float(v) for v in box)
    d.rectangle([x1, y1, x2, y2], outline=color, width=width)
    if not text:
        return
    l, t, r, b = d.textbbox((0, 0), text, font=f)
    tab = place_tab((x1, y1, x2, y2), (r - l + 2 * width + 4, b - t + 2 * width + 2), img.size, taken or (),
                    [tuple(float(v) for v in o) for o in others])
    if taken is not None:
        taken.append(tab)
    d.rectangle(list(tab), fill=color)
    d.text((tab[0] + width + 2 - l, tab[1] + width - t + 1), text, font=f, fill="white")


def draw_banner(img: Image.Image, text: str, color: str) -> None:
    """A label in the top-left corner (a video with no face: the whole frame was classified)."""
    d = ImageDraw.Draw(img)
    f = font(max(11, round(13 * max(img.size) / 640)))
    l, t, r, b = d.textbbox((0, 0), text, font=f)
    d.rectangle([0, 0, r - l + 8, b - t + 6], fill=color)
    d.text((4 - l, 3 - t), text, font=f, fill="white")


def map_rgba(cell_map: torch.Tensor, side: int) -> Image.Image:
    """A ``(grid, grid)`` map in [0, 1] as a smooth ``side`` x ``side`` RGBA image (palette.heat)."""
    return Image.fromarray(heat(upsample(cell_map[None].float(), side)[0].numpy()), "RGBA")


def overlay_map(img: Image.Image, cell_map: torch.Tensor, corners: Sequence[Sequence[float]]) -> Image.Image:
    """``img`` (RGB) with the map drawn over its model crop, whose ``corners`` (top-left, top-right,
    bottom-right, bottom-left, in ``img``'s pixels) may be rotated and scaled."""
    (x0, y0), (x1, y1), _, (x3, y3) = corners
    m = np.array([[x1 - x0, x3 - x0], [y1 - y0, y3 - y0]], np.float64) / MAP_SIDE  # map pixel -> photo
    inv = np.linalg.inv(m)
    shift = -inv @ np.array([x0, y0], np.float64)
    warped = map_rgba(cell_map, MAP_SIDE).transform(
        img.size, Image.AFFINE, (inv[0, 0], inv[0, 1], shift[0], inv[1, 0], inv[1, 1], shift[1]), Image.BILINEAR)
    return Image.alpha_composite(img.convert("RGBA"), warped).convert("RGB")


def why_thumbnail(cell_map: torch.Tensor, crop: Image.Image, side: int = THUMB) -> Image.Image:
    """The model's crop at ``side`` pixels with its map over it."""
    base = crop.convert("RGB").resize((side, side), Image.BICUBIC).convert("RGBA")
    return Image.alpha_composite(base, map_rgba(cell_map, side)).convert("RGB")


def photo_panel(height: int, tops: Sequence[Top], titles: Sequence[str],
                thumbs: Sequence[Image.Image | None] = ()) -> Image.Image:
    """A side panel: per face its title and top-3 bars with the probabilities written out (and,
    with ``thumbs``, its crop with the map beside the bars)."""
    row = 86 if not any(thumbs) else max(86, THUMB + 32)
    width = PANEL_WIDTH + (THUMB + 12 if any(thumbs) else 0)
    panel = Image.new("RGB", (width, max(height, 40 + row * len(tops))), PANEL_BG)
    d = ImageDraw.Draw(panel)
    title_font, row_font = font(15), font(13)
    y = 10
    for k, (title, top) in enumerate(zip(titles, tops)):
        d.text((12, y), title, font=title_font, fill=TEXT)
        if k < len(thumbs) and thumbs[k] is not None:
            panel.paste(thumbs[k], (PANEL_WIDTH, y + 2))
        top_y = y
        y += 22
        for label, p in top:
            d.text((12, y), label, font=row_font, fill=TEXT)
            d.rectangle([84, y + 2, 224, y + 14], fill=TRACK)
            d.rectangle([84, y + 2, 84 + round(140 * max(0.0, min(1.0, p))), y + 14], fill=color_of(label))
            d.text((232, y), f"{100 * p:.1f}%", font=row_font, fill=TEXT)
            y += 18
        y = max(y + 10, top_y + row)
    return panel


def annotate_photo(img: Image.Image, boxes: Sequence[Sequence[float]], tops: Sequence[Top],
                   detected: Sequence[bool], why: Sequence[Why | None] = ()) -> Image.Image:
    """The photo with a numbered box and top label per face, and the top-3 bars beside it; with
    ``why`` (per face its map, crop corners and crop), each map over its face and beside its bars."""
    out = img.convert("RGB").copy()
    for item in why:
        if item is not None:
            out = overlay_map(out, item[0], item[1])
    titles, taken = [], []
    for i, (box, top, det) in enumerate(zip(boxes, tops, detected)):
        others = [b for j, b in enumerate(boxes) if j != i]
        draw_box(out, box, label_text(top, f"{i + 1} "), color_of(top[0][0]), taken, others)
        titles.append(f"{i + 1}. face {i + 1}" if det else f"{i + 1}. the whole image")
    thumbs = [why_thumbnail(item[0], item[2]) if item is not None else None for item in why]
    panel = photo_panel(out.height, tops, titles, thumbs)
    canvas = Image.new("RGB", (out.width + panel.width, max(out.height, panel.height)), PANEL_BG)
    canvas.paste(out, (0, 0))
    canvas.paste(panel, (out.width, 0))
    return canvas
