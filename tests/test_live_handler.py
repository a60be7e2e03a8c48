"""The live handler's stages under a TorchServe-like context (no server) on a real clip, and the
SDK's recognize_stream against it: the same state logic in both."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from handlers.live_handler import EmotionLiveHandler
from model_defs import LABELS, SHIPPED_WEIGHTS
from serving.live import file_frames, jpeg, open_source
from tests.handler_context import extracted_archive, make_context

VIDEO_WEIGHTS = SHIPPED_WEIGHTS["video"]
CLIP = Path(__file__).parent / "fixtures" / "video" / "mead_happy_1s_128.mp4"  # 1 s, one face


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    if not VIDEO_WEIGHTS.is_file():
        pytest.skip(f"{VIDEO_WEIGHTS} is missing: the live model is the shipped per-frame video model")
    return extracted_archive("live", VIDEO_WEIGHTS, tmp_path_factory.mktemp("live-mar"))


def handler_for(model_dir: Path, **options) -> EmotionLiveHandler:
    """A handler on the plain TorchScript graph (the served oneDNN graph compiles for a while;
    tests/test_live_e2e.py serves it)."""
    h = EmotionLiveHandler()
    h.initialize(make_context(model_dir, 1, {"optimize": "off", **options}))
    return h


@pytest.fixture(scope="module")
def frames() -> list:
    with open_source(str(CLIP)) as c:
        return list(file_frames(c, 10.0))


def send(h: EmotionLiveHandler, model_dir: Path, rows: list, headers: list[dict]) -> tuple[list, list[int]]:
    """One batch: ``rows`` with each request's headers (the sequence id among them)."""
    ctx = make_context(model_dir, len(rows))
    for proc, hdr in zip(ctx.request_processor, headers):
        proc._request_header = dict(hdr)  # what TorchServe's frontend sends the worker
    out = h.handle(rows, ctx)
    return out, [ctx.get_response_status(i)[0] for i in range(len(rows))]


def seq(s: str, **more) -> dict:
    return {"ts_request_sequence_id": s, **more}


def test_handler_and_sdk_keep_the_same_state(model_dir, frames):
    """The clip frame by frame through the handler (one sequence) and through
    EmotionRecognizer.recognize_stream: the same frames, people, boxes and smoothed answers."""
    from training import EmotionRecognizer

    h = handler_for(model_dir)
    served = []
    for t, img in frames:
        (answer,), status = send(h, model_dir, [{"data": jpeg(img, 640), "time": str(t)}], [seq("a")])
        assert status == [200], answer
        served.append(answer)
    sdk = list(EmotionRecognizer(model="emo_video_frames").recognize_stream([(t, img) for t, img in frames]))
    assert len(sdk) == len(served) == len(frames) == 10  # 1 s at 25 fps taken at 10 fps
    for s, o in zip(served, sdk):
        assert s["frame"] == o["frame"] and s["keyframe"] == o["keyframe"] and s["time"] == o["time"]
        assert [p["id"] for p in s["people"]] == [p["id"] for p in o["people"]] == [0]
        (ps,), (po,) = s["people"], o["people"]
        assert ps["box"] == pytest.approx(po["box"], abs=1.5)  # JPEG in one, the decoded frame in the other
        assert ps["top3"][0]["label"] == po["top3"][0]["label"]
        assert [ps["probabilities"][k] for k in LABELS] == pytest.approx([po["probabilities"][k] for k in LABELS],
                                                                          abs=0.05)
    assert [x["people"][0]["smoothing"] for x in served] == ["mean"] * 7 + ["pooled"] * 3  # min_frames 8


def test_sequences_in_one_batch_stay_apart_and_a_bad_frame_fails_alone(model_dir, frames):
    h = handler_for(model_dir)
    good = jpeg(frames[0][1], 640)
    out, status = send(h, model_dir, [{"data": good}, {"data": b"garbage"}, {"data": good}],
                       [seq("x"), seq("y"), seq("z")])
    assert status == [200, 415, 200], out
    assert out[1]["code"] == 415 and "cannot decode image" in out[1]["message"]
    assert (out[0]["sequence"], out[2]["sequence"]) == ("x", "z") and out[0]["new"] and out[2]["new"]
    out, status = send(h, model_dir, [{"data": good}, {"data": good}], [seq("x"), seq("y")])
    assert status == [200, 200] and out[0]["frame"] == 2 and out[1]["frame"] == 1


def test_too_many_sequences_get_429_and_closing_frees_one(model_dir, frames):
    h = handler_for(model_dir, max_sequences=2)
    good = jpeg(frames[0][1], 640)
    out, status = send(h, model_dir, [{"data": good}] * 3, [seq("a"), seq("b"), seq("c")])
    assert status == [200, 200, 429], out
    assert "too many live sequences" in out[2]["message"]
    # over REST the end header closes (a request with a Host header); the frame-less request only closes
    out, status = send(h, model_dir, [{}], [seq("a", Host="127.0.0.1:8080", ts_request_sequence_end="true")])
    assert status == [200] and out[0]["closed"] is True and out[0]["people"] == []
    out, status = send(h, model_dir, [{"data": good}], [seq("c")])
    assert status == [200] and out[0]["new"] is True


def test_the_grpc_end_header_is_not_an_end(model_dir, frames):
    """TorchServe 0.12's StreamPredictions2 marks every request as a sequence end: without a Host
    header (not HTTP) only the input ts_request_sequence_end closes the sequence."""
    h = handler_for(model_dir)
    good = jpeg(frames[0][1], 640)
    grpc = seq("g", ts_request_sequence_end="true")
    for k in (1, 2):
        (answer,), _ = send(h, model_dir, [{"data": good}], [grpc])
        assert answer["frame"] == k and "closed" not in answer
    (answer,), _ = send(h, model_dir, [{"data": good, "ts_request_sequence_end": b"true"}], [grpc])
    assert answer["frame"] == 3 and answer["closed"] is True


def test_whole_frames_without_detection(model_dir, frames):
    h = handler_for(model_dir, detection="never")
    img = frames[0][1]
    (answer,), status = send(h, model_dir, [{"data": jpeg(img, 640)}], [seq("w")])
    assert status == [200]
    (person,) = answer["people"]
    assert person["id"] == 0 and person["box"] == [0.0, 0.0, float(img.width), float(img.height)]
    assert sum(person["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
    assert torch.isfinite(torch.tensor(list(person["probabilities"].values()))).all()
