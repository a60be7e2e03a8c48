"""Live state without a server: online tracks, bounded history, smoothing, the sequence store."""
from __future__ import annotations

import pytest
import torch

from export.archive import model_config_for
from handlers.contract import LIVE_DEFAULTS, LIVE_SEQUENCE_IDLE_MS, LIVE_SEQUENCES_PER_WORKER
from handlers.faces import Face
from handlers.live_state import LiveLimits, LiveSequence, SequenceStore
from handlers.preprocess import InputError
from handlers.video_pool import pool
from model_defs import LABELS


def face(x: float, y: float, size: float = 40.0) -> Face:
    """A face box at (x, y) with landmarks inside it."""
    return Face([x, y, x + size, y + size], 0.99, [[x + 12, y + 15], [x + 28, y + 15], [x + 20, y + 22],
                                                   [x + 14, y + 30], [x + 26, y + 30]])


def run(seq: LiveSequence, per_frame: list[list[Face]]) -> list[list[int]]:
    """Step ``seq`` through frames, detecting on keyframes only; the visible ids per frame."""
    ids = []
    for found in per_frame:
        visible = seq.step(found if seq.wants_detection() else None, now=0.0)
        ids.append([p.id for p in visible])
    return ids


def test_limits_come_from_the_contract_and_must_be_positive():
    assert LiveLimits() == LiveLimits.from_mapping(LIVE_DEFAULTS)
    assert LiveLimits.from_mapping({"max_people": 3, "unknown": 1}).max_people == 3
    with pytest.raises(ValueError):
        LiveLimits.from_mapping({"max_history": 0})


def test_ids_stay_with_faces_that_move_and_new_faces_get_new_ids():
    seq = LiveSequence("s", LiveLimits(keyframe_every=3), now=0.0)
    # two faces walking right 6 px a frame, a third arriving at frame 9
    frames = [[face(10 + 6 * t, 10), face(200 + 6 * t, 100)] + ([face(100, 300)] if t >= 9 else [])
              for t in range(15)]
    ids = run(seq, frames)
    assert ids[0] == [0, 1] and all(i[:2] == [0, 1] for i in ids)
    assert ids[9] == [0, 1, 2] and ids[-1] == [0, 1, 2]
    # between keyframes the box is carried forward at the face's velocity
    p0 = seq.people[0]
    assert p0.face.box[0] == pytest.approx(10 + 6 * 14, abs=1e-6)
    # and the landmarks with it, so that the face is aligned where it is
    assert p0.face.landmarks[0] == pytest.approx([10 + 6 * 14 + 12, 10 + 15], abs=1e-6)


def test_a_lost_face_is_dropped_after_lost_after_keyframes_and_ids_are_not_reused():
    limits = LiveLimits(keyframe_every=1, lost_after=2)
    seq = LiveSequence("s", limits, now=0.0)
    ids = run(seq, [[face(10, 10)], [], [face(10, 10)], [], [], [face(10, 10)]])
    # missed once: hidden but kept; found again: same id; missed twice: dropped, back with a new id
    assert ids == [[0], [], [0], [], [], [1]]


def test_people_per_sequence_are_bounded():
    seq = LiveSequence("s", LiveLimits(max_people=2), now=0.0)
    visible = seq.step([face(10, 10), face(100, 10), face(200, 10)], now=0.0)
    assert [p.id for p in visible] == [0, 1] and len(seq.people) == 2


def test_history_is_bounded_and_smoothing_pools_the_recent_window():
    limits = LiveLimits(max_history=5, min_frames=3, smooth_seconds=1.0)
    seq = LiveSequence("s", limits, now=0.0)
    (p,) = seq.step([face(10, 10)], now=0.0)
    rows = torch.eye(len(LABELS))
    happy, sad = LABELS.index("happy"), LABELS.index("sad")
    p.add(0.0, rows[happy])
    smooth, how = p.smoothed(lambda x: pool(x, LABELS, "mean"), limits)
    assert how == "mean" and smooth.argmax() == happy
    for k in range(8):
        p.add(0.1 * (k + 1), rows[sad if k >= 4 else happy])
    assert len(p.probs) == 5 and p.frames == 9  # only the last max_history rows are kept
    smooth, how = p.smoothed(lambda x: pool(x, LABELS, "mean"), limits)
    assert how == "pooled" and smooth.argmax() == sad


def test_frame_time_is_the_clients_and_never_goes_back():
    seq = LiveSequence("s", LiveLimits(), now=100.0)
    assert seq.frame_time(None, now=100.5) == pytest.approx(0.5)
    assert seq.frame_time(2.0, now=101.0) == 2.0
    assert seq.frame_time(1.0, now=101.1) == 2.0
    with pytest.raises(InputError):
        seq.frame_time(float("nan"), now=101.2)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_store_bounds_sequences_expires_idle_ones_and_frees_closed_ones():
    clock = Clock()
    store = SequenceStore(LiveLimits(max_sequences=2, idle_seconds=10.0), clock)
    a, new_a = store.get("a")
    b, _ = store.get("b")
    assert new_a and store.get("a") == (a, False)
    with pytest.raises(InputError) as e:
        store.get("c")
    assert e.value.status == 429 and "too many live sequences" in str(e.value)
    a.last_seen = b.last_seen = 0.0
    clock.t = 5.0
    store.get("a")[0].last_seen = 5.0
    clock.t = 12.0  # b idle 12 s: expired; a idle 7 s: kept
    c, new_c = store.get("c")
    assert new_c and "b" not in store and "a" in store
    assert store.close("c") and not store.close("c") and len(store) == 1
    fresh, new = store.get("b")  # an expired id starts afresh
    assert new and fresh.frames == 0 and fresh is not b
    with pytest.raises(InputError) as e:
        store.get("")
    assert e.value.status == 400


def test_the_archive_turns_sequence_batching_on_with_the_handlers_bounds():
    """TorchServe's sequence settings and the handler's state bounds come from one place: a worker
    serves batchSize sequences, maxNumSequence is that times the workers, both expire alike."""
    cfg = model_config_for("live")
    assert cfg["sequenceBatching"] is True and cfg["sequenceMaxIdleMSec"] == LIVE_SEQUENCE_IDLE_MS
    assert cfg["batchSize"] == LIVE_SEQUENCES_PER_WORKER == cfg["handler"]["max_sequences"]
    assert cfg["maxNumSequence"] == cfg["batchSize"] * cfg["maxWorkers"]
    assert cfg["handler"]["idle_seconds"] * 1000 == LIVE_SEQUENCE_IDLE_MS
    tuned = model_config_for("live", {"batchSize": 3, "maxWorkers": 2, "minWorkers": 2, "sequenceMaxIdleMSec": 5000})
    assert (tuned["maxNumSequence"], tuned["handler"]["max_sequences"], tuned["handler"]["idle_seconds"]) == (6, 3, 5.0)
