"""The state of live streams: per sequence, its people (online face tracks) and their recent answers.

A live sequence is one camera: one frame per request, in order. Per sequence this module keeps

* the people in view: online tracks built from the same pieces as the video handler's tracker
  (``video_track``: one-to-one matching of a frame's faces with each track's face moved on at its
  constant velocity). Faces are detected on every ``keyframe_every``-th frame of the sequence; on
  the frames between, each person's box and landmarks are carried forward at that velocity. A
  person keeps their id as long as a keyframe finds them at least every ``lost_after`` keyframes;
  ids are never reused within a sequence. At most ``max_people`` people are followed.
* per person, the per-frame probabilities of the last ``max_history`` frames they were seen on
  (with each frame's time), from which the smoothed answer is pooled: the video model's pooling
  (``video_pool``) over the person's frames of the last ``smooth_seconds``, once there are
  ``min_frames`` of them, and their plain mean before that.

:class:`SequenceStore` bounds the sequences a worker keeps (``max_sequences``), expires those idle
for ``idle_seconds`` and frees a sequence's state when it is closed. Everything is bounded: per
worker at most ``max_sequences * max_people * max_history`` probability rows (8 x 8 x 128 of 7
floats by default, under 2 MB) plus two faces per person.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import torch

try:  # inside the repository (package import)
    from .contract import LIVE_DEFAULTS
    from .faces import Face
    from .preprocess import InputError
    from .video_track import Track, _predict, match
except ImportError:  # inside a .mar the shared modules sit flat beside the handler
    from contract import LIVE_DEFAULTS  # type: ignore[no-redef]
    from faces import Face  # type: ignore[no-redef]
    from preprocess import InputError  # type: ignore[no-redef]
    from video_track import Track, _predict, match  # type: ignore[no-redef]

IOU_LINK = 0.2
"""Smallest box overlap (after the velocity step) that links a face to a person, as the video tracker's."""

Pool = Callable[[torch.Tensor], torch.Tensor]


def carried(track: Track, frame: int) -> Face:
    """Where the track's face is on ``frame``, moved on at its velocity (``video_track``'s
    prediction), with the landmarks moved and scaled with the box, so that the face aligns there."""
    last = track.faces[track.detected[-1]]
    moved = _predict(track, frame)
    (ax, ay), (bx, by) = _centre(last.box), _centre(moved.box)
    k = moved.size / last.size if last.size > 0 else 1.0
    pts = [[bx + (x - ax) * k, by + (y - ay) * k] for x, y in last.landmarks]
    return replace(moved, landmarks=pts)


def _centre(box: Sequence[float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


@dataclass(frozen=True)
class LiveLimits:
    """The bounds of the live state and how the answer is smoothed (``contract.LIVE_DEFAULTS``)."""

    keyframe_every: int = LIVE_DEFAULTS["keyframe_every"]
    lost_after: int = LIVE_DEFAULTS["lost_after"]
    max_people: int = LIVE_DEFAULTS["max_people"]
    max_history: int = LIVE_DEFAULTS["max_history"]
    max_sequences: int = LIVE_DEFAULTS["max_sequences"]
    idle_seconds: float = float(LIVE_DEFAULTS["idle_seconds"])
    smooth_seconds: float = float(LIVE_DEFAULTS["smooth_seconds"])
    min_frames: int = LIVE_DEFAULTS["min_frames"]

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, object]) -> "LiveLimits":
        """From the handler options (unknown keys ignored), each at least its smallest sane value."""
        kw = {k: type(getattr(cls, k))(v) for k, v in cfg.items() if k in cls.__dataclass_fields__ and v is not None}
        limits = cls(**kw)
        if min(limits.keyframe_every, limits.lost_after, limits.max_people, limits.max_history,
               limits.max_sequences, limits.min_frames) < 1 or limits.idle_seconds <= 0 or limits.smooth_seconds <= 0:
            raise ValueError(f"live limits must be positive: {limits}")
        return limits


@dataclass
class Person:
    """One face followed through a sequence, and the per-frame probabilities it was given."""

    id: int
    track: Track  # its last two detections (the velocity), keyed by the sequence's frame number
    face: Face  # where it is on the current frame (detected or carried forward)
    max_history: int
    missed: int = 0  # keyframes in a row that did not find it
    frames: int = 0  # frames it was classified on
    times: deque = field(default_factory=deque)
    probs: deque = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.times = deque(maxlen=self.max_history)
        self.probs = deque(maxlen=self.max_history)

    @property
    def visible(self) -> bool:
        """Found by the last keyframe (a person missed by one is still followed, not shown)."""
        return self.missed == 0

    def detected(self, frame: int, face: Face) -> None:
        """The detector found it on ``frame``: keep this and the previous detection only."""
        self.track.faces[frame] = face
        self.track.detected.append(frame)
        for old in self.track.detected[:-2]:
            self.track.faces.pop(old, None)
        del self.track.detected[:-2]
        self.face, self.missed = face, 0

    def carry(self, frame: int) -> None:
        """No detection on ``frame``: move the face on at the person's velocity."""
        self.face = carried(self.track, frame)

    def add(self, t: float, probs: torch.Tensor) -> None:
        """The frame's probabilities for this person (at time ``t`` in seconds)."""
        self.times.append(float(t))
        self.probs.append(probs.detach().float().cpu())
        self.frames += 1

    def smoothed(self, pool: Pool, limits: LiveLimits) -> tuple[torch.Tensor, str]:
        """The smoothed probabilities and how they were made: ``pooled`` (the video model's
        pooling over the last ``smooth_seconds``) or ``mean`` (fewer than ``min_frames`` frames)."""
        now = self.times[-1]
        recent = [p for t, p in zip(self.times, self.probs) if now - limits.smooth_seconds < t <= now + 1e-9]
        x = torch.stack(recent)
        if len(recent) < limits.min_frames:
            return x.mean(0), "mean"
        return pool(x), "pooled"


class LiveSequence:
    """One stream's people and frame count; :meth:`step` follows the faces of a new frame."""

    def __init__(self, seq_id: str, limits: LiveLimits, now: float) -> None:
        self.id = seq_id
        self.limits = limits
        self.frames = 0  # frames received
        self.people: list[Person] = []
        self.next_id = 0
        self.started = self.last_seen = now
        self.last_time: float | None = None

    def wants_detection(self) -> bool:
        """Whether the next frame is a keyframe (the first frame always is)."""
        return self.frames % self.limits.keyframe_every == 0

    def frame_time(self, sent: float | None, now: float) -> float:
        """The next frame's time: the client's (``time`` of the request, seconds of its stream) or,
        without one, seconds since the sequence started; never earlier than the previous frame."""
        t = (now - self.started) if sent is None else float(sent)
        if not math.isfinite(t):
            raise InputError(f"time must be a finite number of seconds, not {sent!r}", 400)
        if self.last_time is not None and t < self.last_time:
            t = self.last_time  # a client clock that went back: keep the order
        self.last_time = t
        return t

    def step(self, found: Sequence[Face] | None, now: float) -> list[Person]:
        """Advance one frame with the detector's faces (None: not a keyframe); the people in view."""
        frame = self.frames
        self.frames += 1
        self.last_seen = now
        if found is None:
            for p in self.people:
                p.carry(frame)
            return [p for p in self.people if p.visible]
        predicted = [_predict(p.track, frame) for p in self.people]
        pairs = match(predicted, list(found), IOU_LINK)
        hit = {i for i, _, _ in pairs}
        for i, j, _ in pairs:
            self.people[i].detected(frame, found[j])
        for i, p in enumerate(self.people):
            if i not in hit:
                p.missed += 1
                p.carry(frame)
        self.people = [p for p in self.people if p.missed < self.limits.lost_after]
        taken = {j for _, j, _ in pairs}
        for j, face in enumerate(found):  # largest first: the nearest faces get followed first
            if j in taken or len(self.people) >= self.limits.max_people:
                continue
            person = Person(self.next_id, Track(self.next_id), face, self.limits.max_history)
            person.detected(frame, face)
            self.people.append(person)
            self.next_id += 1
        return [p for p in self.people if p.visible]


class SequenceStore:
    """The live sequences of one worker: at most ``max_sequences``, idle ones expire."""

    def __init__(self, limits: LiveLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self.sequences: OrderedDict[str, LiveSequence] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self.sequences)

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self.sequences

    def expire(self) -> list[str]:
        """Drop the sequences idle for ``idle_seconds``; their ids."""
        now = self.clock()
        gone = [s for s, seq in self.sequences.items() if now - seq.last_seen >= self.limits.idle_seconds]
        for s in gone:
            del self.sequences[s]
        return gone

    def get(self, seq_id: str) -> tuple[LiveSequence, bool]:
        """The sequence's state and whether it is new (an unknown or expired id starts afresh);
        ``InputError(429)`` when the worker already holds ``max_sequences`` live ones."""
        if not seq_id:
            raise InputError("no sequence id: live requests need one (REST header ts_request_sequence_id, "
                             "gRPC StreamPredictions2 sequence_id)", 400)
        self.expire()
        now = self.clock()
        seq = self.sequences.get(seq_id)
        if seq is not None:
            self.sequences.move_to_end(seq_id)
            return seq, False
        if len(self.sequences) >= self.limits.max_sequences:
            raise InputError(f"too many live sequences: this worker already follows {len(self.sequences)} "
                             f"(max_sequences); close one (header ts_request_sequence_end, or the input "
                             f"end=true) or let one expire ({self.limits.idle_seconds:g} s idle)", 429)
        seq = self.sequences[seq_id] = LiveSequence(seq_id, self.limits, now)
        return seq, True

    def close(self, seq_id: str) -> bool:
        """Free a sequence's state; False if there was none."""
        return self.sequences.pop(seq_id, None) is not None
