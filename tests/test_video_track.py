"""Keyframe detection planning and face tracking (handlers/video_track.py), on synthetic detections."""
from __future__ import annotations

import pytest

from handlers.faces import Face
from handlers.video_track import KeyframeTracker, interpolate, iou, match


def face(x: float, y: float, side: float = 40.0, score: float = 0.99) -> Face:
    """A face box at (x, y) with landmarks at fixed places inside it."""
    pts = [[x + side * a, y + side * b] for a, b in ((0.3, 0.4), (0.7, 0.4), (0.5, 0.6), (0.35, 0.8), (0.65, 0.8))]
    return Face([x, y, x + side, y + side], score, pts)


def run(tracker: KeyframeTracker, scene) -> list[list[int]]:
    """Feed ``scene(frame) -> faces`` to the tracker until it is done; the rounds of frames it asked for."""
    rounds = []
    while todo := tracker.pending():
        rounds.append(todo)
        for i in todo:
            tracker.add(i, scene(i))
    return rounds


def test_iou_and_matching():
    a, b = face(0, 0), face(20, 0)
    assert iou(a.box, a.box) == 1.0 and iou(a.box, face(100, 0).box) == 0.0
    assert iou(a.box, b.box) == pytest.approx(800 / 2400)
    pairs = match([face(0, 0), face(200, 0)], [face(205, 0), face(3, 0)], 0.2)
    assert sorted((i, j) for i, j, _ in pairs) == [(0, 1), (1, 0)]


def test_a_still_face_is_detected_on_keyframes_only():
    ids = list(range(0, 100, 4))  # 25 sampled frames
    tr = KeyframeTracker(ids, every=4)
    rounds = run(tr, lambda i: [face(50, 50)])
    assert rounds == [[0, 16, 32, 48, 64, 80, 96]]  # every 4th sampled frame and the last; nothing to refine
    (person,) = tr.tracks()
    assert sorted(person.faces) == ids and person.detected == rounds[0]


def test_disagreeing_keyframes_are_refined_half_way():
    """A face appears at frame 10: the keyframes around it disagree, so the frame between is detected."""
    ids = list(range(20))
    tr = KeyframeTracker(ids, every=8, refine=2)
    rounds = run(tr, lambda i: [face(50, 50)] if i >= 10 else [])
    assert rounds[0] == [0, 8, 16, 19]
    assert rounds[1] == [12] and rounds[2] == [10]  # bisecting towards the change, not every frame
    (person,) = tr.tracks()
    assert min(person.faces) in (9, 10)  # carried to the frames nearer its first detection


def test_boxes_and_landmarks_are_interpolated_between_detections():
    ids = list(range(9))
    tr = KeyframeTracker(ids, every=8, refine=0)
    run(tr, lambda i: [face(2 * i, 0)])  # detected at 0 and 8 only
    (person,) = tr.tracks()
    assert person.detected == [0, 8]
    mid = person.faces[4]
    assert mid.box == pytest.approx([8, 0, 48, 40])
    assert mid.landmarks[0] == pytest.approx([8 + 12, 16])
    assert interpolate(face(0, 0), face(16, 0), 0.5).box == pytest.approx(mid.box)


def test_two_people_are_two_tracks_and_a_one_off_detection_is_dropped():
    ids = list(range(0, 40, 2))
    tr = KeyframeTracker(ids, every=3, refine=0)

    def scene(i: int) -> list[Face]:
        out = [face(10 + i, 20, side=60), face(300 - i, 30, side=40)]  # walking towards each other
        if i == 18:
            out.append(face(500, 400, side=25, score=0.7))  # a flicker
        return out

    run(tr, scene)
    people = tr.tracks()
    assert len(people) == 2
    big, small = people  # most present first: same frames, larger face
    assert big.faces[ids[0]].box[0] == pytest.approx(10) and small.faces[ids[0]].box[0] == pytest.approx(300)
    assert sorted(big.faces) == ids and sorted(small.faces) == ids
    assert [p.id for p in people] == [0, 1]


def test_every_frame_when_asked():
    ids = list(range(10))
    tr = KeyframeTracker(ids, every=1)
    assert run(tr, lambda i: [face(0, 0)]) == [ids]
    with pytest.raises(ValueError):
        KeyframeTracker(ids, every=0)
