"""Faces tracked through a video from detections on keyframes only.

Face detection is most of a video request's cost, so it runs on every ``every``-th sampled frame
(and the last). Where two consecutive keyframes disagree (a face
appears or leaves, or moved so far that its boxes overlap less than ``iou_confident``), the frame
half-way between them is detected too, and so on for up to ``refine`` rounds (at most half as
many frames as keyframes per round): detection follows the action and stays sparse where nothing
changes. Detections are then linked into tracks (one per person) by box overlap after a
constant-velocity prediction, and each track's box and landmarks are interpolated linearly
between its detections, so every sampled frame in a track's span gets its own face to align.

The tracker only plans and links; the caller runs the detector, so that several videos' frames
can be detected in one batch::

    tracker = KeyframeTracker(frame_ids, every=4)
    while (todo := tracker.pending()):
        for i, found in zip(todo, detector.detect([frames[i] for i in todo])):
            tracker.add(i, found)
    people = tracker.tracks()
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

try:  # inside the repository (package import)
    from .faces import Face
except ImportError:  # inside a .mar the shared modules sit flat beside the handler
    from faces import Face  # type: ignore[no-redef]


MAX_CENTRE_SHIFT = 0.8
"""Faces whose boxes barely overlap still match when their centres are closer than this many
face sizes (and the sizes are within 1.5x): a face moving fast between keyframes."""


@dataclass
class Track:
    """One person: a face for each sampled frame of their span (detected or interpolated)."""

    id: int
    faces: dict[int, Face] = field(default_factory=dict)  # frame index -> face
    detected: list[int] = field(default_factory=list)  # frame indices where the detector found them

    @property
    def first(self) -> int:
        return min(self.faces)

    @property
    def last(self) -> int:
        return max(self.faces)

    def mean_box(self) -> list[float]:
        """The average of the detected boxes."""
        boxes = [self.faces[i].box for i in self.detected]
        return [sum(b[k] for b in boxes) / len(boxes) for k in range(4)]

    def presence(self) -> float:
        """Frames covered times mean face size: how much of the video is this person."""
        return len(self.faces) * sum(self.faces[i].size for i in self.detected) / len(self.detected)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _same_face(a: Face, b: Face, min_iou: float) -> float:
    """How well two faces on different frames match (0 = not the same face): their IoU, or,
    when the boxes barely overlap, a small score for a close centre at a similar size."""
    o = iou(a.box, b.box)
    if o >= min_iou:
        return o
    sa, sb = a.size, b.size
    if sa <= 0 or sb <= 0 or max(sa, sb) > 1.5 * min(sa, sb):
        return 0.0
    ca = ((a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2)
    cb = ((b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2)
    dist = math.hypot(ca[0] - cb[0], ca[1] - cb[1]) / max(sa, sb)
    return 0.5 * min_iou * (1.0 - dist / MAX_CENTRE_SHIFT) if dist < MAX_CENTRE_SHIFT else 0.0


def match(prev: Sequence[Face], cur: Sequence[Face], min_iou: float) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching of two frames' faces, best pairs first: ``(i, j, score)``."""
    pairs = sorted(((_same_face(a, b, min_iou), i, j) for i, a in enumerate(prev) for j, b in enumerate(cur)),
                   reverse=True)
    used_i: set[int] = set()
    used_j: set[int] = set()
    out = []
    for s, i, j in pairs:
        if s <= 0:
            break
        if i not in used_i and j not in used_j:
            used_i.add(i)
            used_j.add(j)
            out.append((i, j, s))
    return out


def _predict(t: Track, frame: int) -> Face:
    """Where track ``t``'s face should be on ``frame``: its last box moved on at the velocity
    between its last two detections (people walk across street scenes faster than a face width
    between keyframes)."""
    last = t.faces[t.detected[-1]]
    if len(t.detected) < 2:
        return last
    a, b = t.detected[-2], t.detected[-1]
    k = (frame - b) / (b - a)
    return Face([x + (x - y) * k for x, y in zip(last.box, t.faces[a].box)], last.score, last.landmarks,
                last.detector)


def interpolate(a: Face, b: Face, t: float) -> Face:
    """The face a fraction ``t`` of the way from ``a`` to ``b`` (box, landmarks and score)."""
    box = [x + (y - x) * t for x, y in zip(a.box, b.box)]
    pts = [[p[0] + (q[0] - p[0]) * t, p[1] + (q[1] - p[1]) * t] for p, q in zip(a.landmarks, b.landmarks)]
    return Face(box, min(a.score, b.score), pts, a.detector)


class KeyframeTracker:
    """Plans which sampled frames to detect on and links the detections into tracks."""

    def __init__(self, frame_ids: Sequence[int], every: int = 4, refine: int = 1,
                 iou_link: float = 0.2, iou_confident: float = 0.5, max_missed: int = 1,
                 agree_area: float = 0.8) -> None:
        if every < 1:
            raise ValueError("every must be at least 1")
        self.ids = sorted(set(int(i) for i in frame_ids))
        self.every, self.refine = int(every), int(refine)
        self.iou_link, self.iou_confident, self.max_missed = iou_link, iou_confident, max_missed
        self.agree_area = agree_area
        self.found: dict[int, list[Face]] = {}  # frame index -> detections
        self._round = 0
        self._budget = 0  # refinement frames per round

    def pending(self) -> list[int]:
        """The frames to detect next (empty when done): keyframes first, then, for up to
        ``refine`` rounds, the half-way frames between detected frames that disagree (at most
        half as many as there are keyframes per round, the worst-agreeing gaps first)."""
        n = len(self.ids)
        if not n:
            return []
        if self._round == 0:
            self._round = 1
            pos = sorted(set(range(0, n, self.every)) | {n - 1})
            self._budget = max(1, len(pos) // 2)
            return [self.ids[p] for p in pos]
        if self._round > self.refine:
            return []
        self._round += 1
        done = [p for p, i in enumerate(self.ids) if i in self.found]
        gaps = [(self._agreement(self.found[self.ids[a]], self.found[self.ids[b]]), (a + b) // 2)
                for a, b in zip(done, done[1:]) if b - a > 1]
        worst = sorted((g for g in gaps if g[0] < self.agree_area), key=lambda g: g[0])[: self._budget]
        return sorted(self.ids[p] for _, p in worst)

    def _agreement(self, a: Sequence[Face], b: Sequence[Face]) -> float:
        """How sure tracking is across a gap (1 = sure): the share of face area, at the end where
        it is smaller, taken by faces matched across the gap with IoU >= ``iou_confident``. A
        small face flickering in a crowd lowers it little; the main face moving or appearing a lot."""
        if not a and not b:
            return 1.0
        good = [(i, j) for i, j, s in match(a, b, self.iou_link) if s >= self.iou_confident]
        share = 1.0
        for faces, side in ((a, 0), (b, 1)):
            total = sum(f.size ** 2 for f in faces)
            if total > 0:
                share = min(share, sum(faces[p[side]].size ** 2 for p in good) / total)
        return share

    def add(self, frame_id: int, faces: Sequence[Face]) -> None:
        """The detector's faces on one frame (already filtered: size, count)."""
        self.found[int(frame_id)] = list(faces)

    def detected_frames(self) -> int:
        return len(self.found)

    def tracks(self, min_hits: int | None = None) -> list[Track]:
        """People, most present first (frames covered times face size). ``min_hits``: detections
        a track needs to count (default: 2 when at least 3 frames were detected, else 1), which
        drops one-off false detections."""
        if min_hits is None:
            min_hits = 2 if len(self.found) >= 3 else 1
        tracks: list[Track] = []
        active: list[tuple[Track, int]] = []  # (track, detected frames missed since its last hit)
        for fid in sorted(self.found):
            dets = self.found[fid]
            last = [_predict(t, fid) for t, _ in active]
            pairs = match(last, dets, self.iou_link)
            hit_t = {i for i, _, _ in pairs}
            hit_d = {j for _, j, _ in pairs}
            nxt: list[tuple[Track, int]] = []
            for i, j, _ in pairs:
                t = active[i][0]
                t.faces[fid] = dets[j]
                t.detected.append(fid)
                nxt.append((t, 0))
            for i, (t, missed) in enumerate(active):
                if i not in hit_t and missed < self.max_missed:
                    nxt.append((t, missed + 1))
            for j, d in enumerate(dets):
                if j not in hit_d:
                    t = Track(id=len(tracks), faces={fid: d}, detected=[fid])
                    tracks.append(t)
                    nxt.append((t, 0))
            active = nxt
        people = [t for t in tracks if len(t.detected) >= min_hits]
        for t in people:
            self._fill(t)
        people.sort(key=lambda t: t.presence(), reverse=True)
        for k, t in enumerate(people):
            t.id = k
        return people

    def _fill(self, t: Track) -> None:
        """Interpolate between the track's detections; carry its ends to the sampled frames that
        are nearer to its first/last detection than to the detected frame where it was missing."""
        pos = {i: p for p, i in enumerate(self.ids)}
        det = sorted(t.detected)
        for a, b in zip(det, det[1:]):
            pa, pb = pos[a], pos[b]
            for p in range(pa + 1, pb):
                t.faces[self.ids[p]] = interpolate(t.faces[a], t.faces[b], (p - pa) / (pb - pa))
        seen = sorted(self.found)
        for end, step in ((det[0], -1), (det[-1], 1)):
            k = seen.index(end)
            nb = k + step
            limit = pos[seen[nb]] if 0 <= nb < len(seen) else (-1 if step < 0 else len(self.ids))
            p = pos[end] + step
            while 0 <= p < len(self.ids) and (abs(p - pos[end]) < abs(limit - p) if 0 <= limit < len(self.ids)
                                              else True):
                t.faces[self.ids[p]] = t.faces[end]
                p += step
