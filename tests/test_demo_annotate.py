"""``python -m demo.annotate``: annotated photos and videos from fixtures, in process.

The annotated group photo and the clip's timeline plot are written to docs/ for the README.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from demo.annotate import main
from demo.draw import PANEL_WIDTH, THUMB
from demo.palette import LABEL_COLORS
from handlers.contract import IMAGE_DEFAULTS
from handlers.faces import detector_for
from tests.test_faces import GROUP_BOXES, iou

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
FIXTURES = Path(__file__).parent / "fixtures"
GROUP = FIXTURES / "photos" / "group.jpg"
CLIP = FIXTURES / "video" / "face_leaves_hevc_256x144.mov"  # a face for ~2 s, then a cartoon title
PALETTE = {tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in LABEL_COLORS.values()}


def palette_share(pixels: np.ndarray, tol: int = 40) -> float:
    """The fraction of ``(N, 3)`` RGB pixels within ``tol`` (per channel) of a label colour."""
    colors = np.array(sorted(PALETTE), dtype=np.int32)
    dist = np.abs(pixels[:, None, :].astype(np.int32) - colors[None]).max(-1).min(-1)
    return float((dist <= tol).mean())


def edge(arr: np.ndarray, box) -> np.ndarray:
    """The pixels on a box's left edge (its middle half)."""
    x1, y1, _, y2 = (round(v) for v in box)
    h = y2 - y1
    return arr[y1 + h // 4: y2 - h // 4, x1]


def test_photo_gets_boxes_labels_and_top3(tmp_path):
    out = tmp_path / "group.png"
    assert main([str(GROUP), "-o", str(out)]) == 0
    src, got = Image.open(GROUP), Image.open(out)
    assert got.format == "PNG" and got.width == src.width + PANEL_WIDTH and got.height >= src.height
    arr, before = np.asarray(got.convert("RGB")), np.asarray(src.convert("RGB"))
    found = [f.box for f in detector_for(IMAGE_DEFAULTS).detect([src.convert("RGB")])[0]]
    for want in GROUP_BOXES:  # a box in a label colour on each face, where the photo had none
        box = max(found, key=lambda b: iou(b, want))  # as the default detector placed it
        assert palette_share(edge(arr, box), tol=0) > 0.9 and palette_share(edge(before, box), tol=0) < 0.1
    panel = arr[:, src.width:]
    assert palette_share(panel.reshape(-1, 3), tol=10) > 0.003  # the top-3 bars
    shutil.copyfile(out, DOCS / "annotated_group.png")


def test_explain_draws_each_faces_map_over_it_and_beside_its_bars(tmp_path):
    plain, why = tmp_path / "group.png", tmp_path / "group_why.png"
    assert main([str(GROUP), "-o", str(plain)]) == 0
    assert main([str(GROUP), "-o", str(why), "--explain"]) == 0
    src, a, b = Image.open(GROUP), Image.open(plain), Image.open(why)
    assert b.width == src.width + PANEL_WIDTH + THUMB + 12 and b.height >= src.height
    photo_a = np.asarray(a.convert("RGB"))[: src.height, : src.width].astype(int)
    photo_b = np.asarray(b.convert("RGB"))[: src.height, : src.width].astype(int)
    diff = np.abs(photo_b - photo_a).max(-1)
    changed, tinted = diff > 30, diff > 5  # strongly drawn; visibly tinted (a peaked map is faint elsewhere)
    near_a_face = np.zeros_like(changed)
    for x1, y1, x2, y2 in GROUP_BOXES:  # the aligned crop is about the face box, turned and scaled
        w, h = x2 - x1, y2 - y1
        near_a_face[max(0, int(y1 - h)):int(y2 + h), max(0, int(x1 - w)):int(x2 + w)] = True
        assert tinted[int(y1):int(y2), int(x1):int(x2)].mean() > 0.05  # the map over the face
        assert changed[int(y1):int(y2), int(x1):int(x2)].any()  # its strongest cells at full colour
    assert changed[~near_a_face].mean() == 0  # nothing drawn away from the faces
    red = photo_b[..., 0] - photo_b[..., 2]  # the map's colours run from yellow to red
    assert (red[changed] > red[~changed].mean()).mean() > 0.9
    shutil.copyfile(why, DOCS / "annotated_group_why.png")


def test_video_gets_tracked_boxes_and_a_timeline_plot(tmp_path, caplog):
    out = tmp_path / "clip.mp4"
    with caplog.at_level(logging.INFO):
        assert main([str(CLIP), "-o", str(out), "--no-progress"]) == 0
    plot = tmp_path / "clip_timeline.png"
    assert "1 people tracked" in caplog.text and plot.is_file()
    with av.open(str(CLIP)) as a, av.open(str(out)) as b:
        assert b.streams.video[0].codec_context.name == "h264"
        src = [f.to_ndarray(format="rgb24") for f in a.decode(video=0)]
        got = [f.to_ndarray(format="rgb24") for f in b.decode(video=0)]
    assert len(got) == len(src) == 85 and got[0].shape == src[0].shape
    changed = [float((np.abs(g.astype(int) - s.astype(int)).max(-1) > 60).mean()) for g, s in zip(got, src)]
    assert min(changed[5:25]) > 0.01  # the face's box and label while the face is there (first ~2 s)
    assert max(changed[45:]) < 0.005  # nothing drawn once it has left (only coding noise)
    img = Image.open(plot)
    assert img.format == "PNG" and img.size == (800, 360)
    assert palette_share(np.asarray(img.convert("RGB")).reshape(-1, 3), tol=10) > 0.002  # seven lines
    shutil.copyfile(plot, DOCS / "annotated_clip_timeline.png")


def test_bad_input_is_a_clear_error(tmp_path, caplog):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(GROUP.read_bytes()[:3000])
    with caplog.at_level(logging.ERROR):
        assert main([str(bad), "-o", str(tmp_path / "bad.png")]) == 2
    assert "cannot decode image: corrupt or truncated" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main([str(CLIP), "-o", str(tmp_path / "clip.png")]) == 2
    assert "a video is written as .mp4" in caplog.text
