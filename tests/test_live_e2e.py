"""End to end: emotion_live.mar on a real TorchServe, real clips streamed over gRPC StreamPredictions2
and REST with sequence ids (TorchServe's sequence batching), one server for the module."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from export.__main__ import main as export_main
from handlers.contract import LIVE_DEFAULTS, LIVE_SEQUENCE_HEADER
from model_defs import LABELS, SHIPPED_WEIGHTS
from serving import running_server
from serving.live import LiveStream, file_frames, jpeg, open_source
from tests.test_video_frames import GROUP
from tests.tsserver import send_together

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

VIDEO_WEIGHTS = SHIPPED_WEIGHTS["video"]
FIXTURES = Path(__file__).parent / "fixtures" / "video"
LABELLED = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos" / "labelled"
MODEL = "emotion_live"
SEQUENCES = 3  # the test archive's batchSize: maxNumSequence with one worker
IDLE_MS = 5000  # the test archive's sequenceMaxIdleMSec (long enough for a busy machine's answers)


def clip(name: str, fixture: str) -> Path:
    """A labelled clip of the shared data, or the fixture clip when the data is absent."""
    return LABELLED / name if (LABELLED / name).is_file() else FIXTURES / fixture


HAPPY = clip("M030_front_happy_level3_001.mp4", "mead_happy_1s_128.mp4")
OTHER = clip("M030_front_surprised_level3_001.mp4", "face_leaves_hevc_256x144.mov")


def frames_of(path: Path, fps: float = 10.0, limit: int = 0) -> list[tuple[float, bytes]]:
    """``(time, JPEG)`` of a clip at ``fps``, as ``serving.live`` sends them."""
    with open_source(str(path)) as c:
        out = [(t, jpeg(img, 640)) for t, img in file_frames(c, fps)]
    return out[:limit] if limit else out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not VIDEO_WEIGHTS.is_file():
        pytest.skip(f"{VIDEO_WEIGHTS} is missing: the live model is the shipped per-frame video model")
    tmp = tmp_path_factory.mktemp("live-e2e")
    store = tmp / "model_store"
    assert export_main(["--task", "live", "--checkpoint", str(VIDEO_WEIGHTS), "--out", str(store),
                        "--batch-size", str(SEQUENCES), "--sequence-idle-ms", str(IDLE_MS)]) == 0
    with running_server(store, [f"{MODEL}={MODEL}.mar"], tmp / "server") as ts:
        yield ts


def stream(ts, frames: list[tuple[float, bytes]], close: bool = True) -> tuple[str, list[dict]]:
    """Send ``frames`` over one StreamPredictions2 call; the sequence id and every answer."""
    live = LiveStream(ts.grpc_inference, MODEL, ts.keys["inference"])
    try:
        answers = [live.send(data, t) for t, data in frames]
        if close:
            answers.append(live.send(None, end=True))
    finally:
        live.close()
    return live.sequence_id, answers


def rest(ts, data: bytes, seq: str | None = None, **headers) -> requests.Response:
    h = {**ts.auth(), "Content-Type": "image/jpeg", **headers}
    if seq:
        h[LIVE_SEQUENCE_HEADER] = seq
    return requests.post(ts.predictions_url(MODEL), data=data, headers=h, timeout=60)


def wait_for_expiry() -> None:
    """Long enough for TorchServe and the handler to expire the sequences of earlier tests."""
    time.sleep(IDLE_MS / 1000 + 1.0)


@pytest.fixture(scope="module")
def two_streams(server):
    """Two clips streamed at the same time over two gRPC calls: {clip: (sequence id, answers)}."""
    clips = {HAPPY: frames_of(HAPPY), OTHER: frames_of(OTHER, limit=30)}
    out: dict[Path, tuple[str, list[dict]]] = {}
    start = threading.Barrier(2)

    def go(path: Path) -> None:
        start.wait()
        out[path] = stream(server, clips[path])

    threads = [threading.Thread(target=go, args=(p,)) for p in clips]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(out) == set(clips)
    return out


def test_two_concurrent_streams_keep_their_own_state(two_streams):
    (seq_a, a), (seq_b, b) = two_streams[HAPPY], two_streams[OTHER]
    assert seq_a != seq_b
    for seq, answers in ((seq_a, a), (seq_b, b)):
        *frames, closing = answers
        assert all(x.get("sequence") == seq for x in answers), answers[0]
        # every frame of this stream counted once, in order, from a fresh start: nothing of the other
        assert [x["frame"] for x in frames] == list(range(1, len(frames) + 1))
        assert [x["new"] for x in frames] == [True] + [False] * (len(frames) - 1)
        assert closing["closed"] is True and closing["people"] == []
        ids = {p["id"] for x in frames for p in x["people"]}
        assert ids == {0}, ids  # one face each, the same person throughout
        seen = [x for x in frames if x["people"]]
        assert len(seen) >= 0.8 * len(frames)
        for x in seen:
            p = x["people"][0]
            assert set(p["probabilities"]) == set(LABELS)
            assert [t["label"] for t in p["top3"]][0] == max(p["probabilities"], key=p["probabilities"].get)
            assert len(p["frame_top3"]) == 3 and p["frames"] <= x["frame"]
    # the smoothed answers of the two people differ (each is pooled from its own frames); a clip's
    # last frames may have nobody found, so each stream's last answer with a person is compared
    def last_person(answers: list[dict]) -> dict:
        return next(x for x in reversed(answers[:-1]) if x["people"])["people"][0]
    assert last_person(a)["probabilities"] != last_person(b)["probabilities"]


def test_a_one_emotion_clip_ends_on_that_emotion(two_streams):
    """The happy clip's smoothed label is happy by its end, pooled the video model's way."""
    _, answers = two_streams[HAPPY]
    last = answers[-2]["people"][0]
    assert last["smoothing"] == "pooled" and last["top3"][0]["label"] == "happy", last


def test_ids_stay_with_faces_while_they_move(server):
    """The four-face group photo sliding right 8 px a frame over a grey background (real faces,
    moving): each of the four keeps its id on every frame, and each box moves with the photo."""
    photo = Image.open(GROUP).convert("RGB")
    step, n = 8, 20
    frames = []
    for k in range(n):
        canvas = Image.new("RGB", (photo.width + step * n, photo.height + 20), (128, 128, 128))
        canvas.paste(photo, (step * k, 10))
        frames.append((k / 10, jpeg(canvas, canvas.width)))
    _, answers = stream(server, frames)
    *answers, closing = answers
    first = {p["id"]: p["box"] for p in answers[0]["people"]}
    assert len(first) >= 4, answers[0]
    main = sorted(first)[:4]  # followed from the first frame, largest first
    for k, x in enumerate(answers):
        now = {p["id"]: p["box"] for p in x["people"]}
        assert set(main) <= set(now), (k, first, now)
        # every face moves right with the photo: found there on keyframes, carried on at its
        # velocity in between (which the first keyframe interval does not know yet)
        tolerance = 12 if x["keyframe"] else step * LIVE_DEFAULTS["keyframe_every"]
        for pid in main:
            assert abs(now[pid][0] - first[pid][0] - step * k) < tolerance, (k, pid, now[pid], first[pid])
    assert closing["closed"] is True


def test_rest_sequence_header_unknown_and_expired_ids_and_close(server):
    wait_for_expiry()
    (_, frame), (_, frame2) = frames_of(HAPPY, limit=2)
    r = rest(server, frame)  # no id: TorchServe makes one, the answer and its header carry it
    assert r.status_code == 200, r.text
    made = r.json()["sequence"]
    assert made.startswith("ts-seq-") and r.headers.get(LIVE_SEQUENCE_HEADER) == made
    first = rest(server, frame, "rest-a").json()  # an id nobody has seen: a fresh start
    again = rest(server, frame2, "rest-a").json()
    assert (first["frame"], first["new"], again["frame"], again["new"]) == (1, True, 2, False)
    bad = rest(server, b"not a jpeg", "rest-a")  # a bad frame fails alone; the sequence goes on
    assert bad.status_code == 415 and bad.json()["code"] == 415
    closing = rest(server, frame, "rest-a", ts_request_sequence_end="true").json()
    assert closing["frame"] == 3 and closing["closed"] is True
    reopened = rest(server, frame, "rest-a").json()  # a closed sequence's state is gone
    assert reopened["frame"] == 1 and reopened["new"] is True
    wait_for_expiry()  # an expired sequence starts afresh too
    expired = rest(server, frame2, "rest-a").json()
    assert expired["frame"] == 1 and expired["new"] is True


def test_the_client_prints_labels_and_writes_the_csv(server, tmp_path, capsys):
    """``python -m serving.live --source clip --csv``: a line per label change, a CSV row per
    person per frame with the seven smoothed probabilities, the sequence closed at the end."""
    from serving.live import main

    clip = FIXTURES / "mead_happy_1s_128.mp4"
    out = tmp_path / "live.csv"
    assert main(["--source", str(clip), "--target", server.grpc_inference, "--csv", str(out), "--quiet",
                 "--key-file", str(server.workdir / "key_file.json")]) == 0
    printed = capsys.readouterr().out
    assert "person 0: happy" in printed and "10 frames, sequence live-" in printed
    rows = out.read_text().splitlines()
    assert rows[0] == "time,frame,person,label," + ",".join(LABELS) + ",frame_label"
    assert len(rows) == 1 + 10 and [r.split(",")[1] for r in rows[1:]] == [str(k) for k in range(1, 11)]
    last = rows[-1].split(",")
    assert last[2:4] == ["0", "happy"] and abs(sum(map(float, last[4:11])) - 1) < 2e-3


def test_one_sequence_too_many_is_refused_while_the_others_go_on(server, capsys):
    wait_for_expiry()
    (_, frame), = frames_of(HAPPY, limit=1)
    ids = [f"cap-{i}" for i in range(SEQUENCES)]
    opened = send_together(lambda seq: rest(server, frame, seq), ids)
    assert [r.status_code for r in opened] == [200] * SEQUENCES
    refused = rest(server, frame, "cap-extra")
    assert refused.status_code == 503, refused.text
    assert "sequence" in refused.json()["message"]
    going = send_together(lambda seq: rest(server, frame, seq), ids)  # the others keep going
    for seq, r in zip(ids, going):
        assert r.status_code == 200 and r.json()["frame"] == 2 and r.json()["sequence"] == seq
        assert np.isfinite(r.json()["people"][0]["probabilities"]["happy"])
    live = LiveStream(server.grpc_inference, MODEL, server.keys["inference"])  # over gRPC too
    try:
        answer = live.send(frame, 0.0)
    finally:
        live.close()
    assert "people" not in answer and "sequence" in answer["message"]
    from serving.live import main  # the client stops there and says why

    assert main(["--source", str(FIXTURES / "mead_happy_1s_128.mp4"), "--target", server.grpc_inference, "--quiet",
                 "--key-file", str(server.workdir / "key_file.json")]) == 1
    assert "try again when one ends" in capsys.readouterr().out


def test_the_worker_reports_its_metrics(server):
    """The handlers' custom metrics (handlers/metrics.py) for the live model on /metrics."""
    deadline = time.monotonic() + 30  # the frontend parses the workers' metric log lines
    while True:
        text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
        mine = [line for line in text.splitlines() if f'ModelName="{MODEL}"' in line]
        names = {line.split("{")[0] for line in mine}
        if {"emotion_requests_total", "emotion_faces_total", "emotion_detect_ms_total"} <= names:
            break
        assert time.monotonic() < deadline, mine
        time.sleep(1)
    faces = [float(line.rsplit(" ", 1)[1]) for line in mine if line.startswith("emotion_faces_total")]
    assert sum(faces) > 50  # a face per frame of the streams above
