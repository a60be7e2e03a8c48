"""demo.draw's label tabs: above their box, kept off one another and off the other faces."""
from __future__ import annotations

import numpy as np
from PIL import Image

from demo.draw import _overlaps, draw_box, place_tab

FRAME = (800, 450)
TAB = (120.0, 20.0)


def test_a_lone_box_has_its_tab_just_above_it_or_inside_at_the_top_edge():
    assert place_tab((100, 100, 160, 170), TAB, FRAME) == (100, 80, 220, 100)
    assert place_tab((100, 5, 160, 70), TAB, FRAME) == (100, 5, 220, 25)  # no room above
    assert place_tab((750, 100, 790, 150), TAB, FRAME)[2] <= FRAME[0]  # kept inside the picture


def test_tabs_of_nearby_faces_do_not_cover_one_another_nor_the_other_faces():
    """The group photo's case: two faces side by side, the second's tab would cover the first's."""
    boxes = [(475, 230, 515, 285), (520, 225, 555, 268), (470, 300, 520, 350)]
    taken = []
    for i, box in enumerate(boxes):
        others = [b for j, b in enumerate(boxes) if j != i]
        tab = place_tab(box, TAB, FRAME, taken, others)
        assert not any(_overlaps(tab, t) for t in taken)
        assert not any(_overlaps(tab, o) for o in others)
        taken.append(tab)
    assert taken[0] == (475, 190, 595, 210)  # above its face, one step up: the usual place covers face 2


def test_where_every_spot_covers_a_face_the_tab_still_avoids_the_other_tabs():
    box, crowd = (200, 200, 240, 240), [(150, 0, 400, 199), (150, 241, 400, 450)]
    taken = [place_tab((100, 100, 140, 140), TAB, FRAME)]
    tab = place_tab(box, TAB, FRAME, taken, crowd)
    assert not _overlaps(tab, taken[0])


def test_draw_box_records_the_tab_it_draws_in_the_boxs_colour():
    img = Image.new("RGB", FRAME, (0, 0, 0))
    taken = []
    draw_box(img, (100, 100, 160, 170), "1 happy 90.0%", "#ff0000", taken)
    draw_box(img, (130, 100, 190, 170), "2 sad 80.0%", "#0000ff", taken, [(100, 100, 160, 170)])
    assert len(taken) == 2 and not _overlaps(taken[0], taken[1])
    arr = np.asarray(img)
    for tab, colour in zip(taken, ([255, 0, 0], [0, 0, 255])):
        x1, y1, x2, y2 = (round(v) for v in tab)
        inside = arr[y1 + 1:y2 - 1, x1 + 1:x2 - 1].reshape(-1, 3)
        assert (inside == colour).all(1).mean() > 0.5  # filled in the box's colour under the white text
