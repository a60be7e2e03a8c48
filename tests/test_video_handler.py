"""The video handler's stages under a TorchServe-like context, without a server, on real encoded clips."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from export.__main__ import main as export_main
from export.archive import ALL_TASKS
from export.torchscript import example_input, load_scripted
from handlers.video_decode import sample_indices
from handlers.video_handler import EmotionVideoHandler
from model_defs import LABELS, create_model, save_weights
from tests.handler_context import make_context, run_handler as run
from tests import videoutil

FIXTURES = Path(__file__).parent / "fixtures" / "video"
MP4 = FIXTURES / "mead_happy_1s_128.mp4"  # 1 s, 25 frames, a face throughout
MOV = FIXTURES / "face_leaves_hevc_256x144.mov"  # 5.7 s HEVC, the face leaves after ~2 s


def video_checkpoint(path: Path) -> Path:
    """A random hybrid video checkpoint whose frame CNN comes from a random image checkpoint."""
    torch.manual_seed(0)
    model = create_model("emo_video_hybrid")
    image = create_model("emo_resnet_s")
    model.load_frame_weights({"spec": image.spec.to_dict(), "state_dict": image.state_dict()})
    save_weights(model, path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An extracted emotion_video.mar built from random weights."""
    tmp = tmp_path_factory.mktemp("vmar")
    ckpt = video_checkpoint(tmp / "video.pth")
    assert export_main(["--task", "video", "--checkpoint", str(ckpt), "--out", str(tmp)]) == 0
    out = tmp / "model"
    with zipfile.ZipFile(tmp / "emotion_video.mar") as z:
        z.extractall(out)
    return out


@pytest.fixture(scope="module")
def handler(model_dir) -> EmotionVideoHandler:
    h = EmotionVideoHandler()
    h.initialize(make_context(model_dir, 1))
    return h


def check_top3(top: list) -> None:
    labels = [t["label"] for t in top]
    probs = [t["probability"] for t in top]
    assert len(top) == 3 and len(set(labels)) == 3 and set(labels) <= set(LABELS)
    assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)


def flat_clip(levels: list[int], size: int = 64) -> list[np.ndarray]:
    """Frames of one grey level each (no face anywhere)."""
    return [np.full((size, size, 3), v, np.uint8) for v in levels]


def test_archive_and_spec(handler, model_dir):
    names = {p.name for p in model_dir.iterdir()}
    assert {"video_handler.py", "common.py", "faces.py", "preprocess.py", "video_decode.py"} <= names
    assert "image_handler.py" not in names
    cfg = yaml.safe_load((model_dir / "model-config.yaml").read_text())
    wanted = ALL_TASKS["video"].model_config
    assert (cfg["batchSize"], cfg["maxBatchDelay"]) == (wanted["batchSize"], wanted["maxBatchDelay"])
    assert cfg["maxBatchDelay"] <= 10  # a lone clip is not held back waiting for others
    assert {"max_bytes", "max_duration_s", "max_frames", "max_pixels", "window_seconds",
            "window_stride", "detection"} <= set(cfg["handler"])
    assert handler.limits.max_duration_s == cfg["handler"]["max_duration_s"]
    assert handler.clip_len == 16 and handler.time_dim == 1 and handler.labels == list(LABELS)


def test_example_input_is_channels_then_time(model_dir):
    scripted, spec = load_scripted(next(model_dir.glob("*.pt")))
    x = example_input(spec, 2)
    assert tuple(x.shape) == (2, 1, 16, 48, 48)
    no_shape = {**spec, "extra": {}}
    assert tuple(example_input(no_shape, 1).shape) == (1, 1, 16, 48, 48)
    with torch.inference_mode():
        assert tuple(scripted(x).shape) == (2, len(LABELS))


def test_mixed_batch_fails_only_the_bad_requests(handler, model_dir):
    good = MP4.read_bytes()
    long_clip = videoutil.encode(flat_clip([128] * 65), "mp4", fps=1)  # 65 s > 60 s limit
    rows = [{"body": good},
            {"body": good[: len(good) // 3]},  # truncated MP4
            {"body": videoutil.encode_audio("wav", "pcm_s16le")},  # WAV: not a video container
            {"body": videoutil.encode_audio("mp4", "aac")},  # MP4 with audio only
            {"body": long_clip},
            {"body": b"\x00" * 1000},
            {"body": MOV.read_bytes()}]
    out, status = run(handler, model_dir, rows)
    assert status == [200, 400, 415, 422, 413, 415, 200]
    for i in (1, 2, 3, 4, 5):
        assert set(out[i]) == {"code", "type", "message"} and out[i]["code"] == status[i]
    assert "corrupt" in out[1]["message"]
    assert "no video stream" in out[3]["message"]
    assert "too long" in out[4]["message"] and "60" in out[4]["message"]
    # the good ones get exactly what they get alone
    alone_mp4, _ = run(handler, model_dir, [{"body": good}])
    alone_mov, _ = run(handler, model_dir, [{"body": MOV.read_bytes()}])
    assert _same(out[0], alone_mp4[0])
    assert _same(out[6], alone_mov[0])


def _same(a: dict, b: dict, tol: float = 1e-5) -> bool:
    """Equal answers up to float noise in the probabilities."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) <= tol
    return a == b


def test_short_clip_has_no_timeline(handler, model_dir):
    (answer,), status = run(handler, model_dir, [{"body": MP4.read_bytes()}])
    assert status == [200]
    assert set(answer) == {"top3", "duration", "frames", "fps", "faces", "people"}
    check_top3(answer["top3"])
    assert answer["frames"] == 25 and answer["fps"] == pytest.approx(25.0) and answer["duration"] == pytest.approx(1.0)
    faces = answer["faces"]
    assert (faces["found_frames"], faces["sampled_frames"], faces["whole_frame"]) == (16, 16, False)
    assert 0 < faces["detected_frames"] < 16  # keyframes only
    (person,) = answer["people"]  # one face: one person, who is the main answer
    assert person["top3"] == answer["top3"] and person["found_frames"] == 16


def test_long_clip_has_a_timeline_and_the_face_leaves(handler, model_dir):
    (answer,), status = run(handler, model_dir, [{"body": MOV.read_bytes()}])
    assert status == [200]
    assert answer["frames"] == 85 and answer["duration"] == pytest.approx(85 / 15, abs=1e-3)
    timeline = answer["timeline"]
    assert [(w["start"], w["end"]) for w in timeline] == [(0.0, 2.0), (2.0, 4.0),
                                                          (pytest.approx(answer["duration"] - 2.0, abs=1e-3),
                                                           pytest.approx(answer["duration"], abs=1e-3))]
    for w in timeline:
        check_top3(w["top3"])
    faces = answer["faces"]
    # the face is there for the first ~2 s only: some sampled frames have it, most do not
    assert 0 < faces["found_frames"] < faces["sampled_frames"] and faces["whole_frame"] is False
    assert faces["sampled_frames"] <= 16 * (1 + len(timeline))


def test_no_face_anywhere_classifies_whole_frames(handler, model_dir):
    (answer,), status = run(handler, model_dir, [{"body": videoutil.encode(flat_clip([90] * 12, 96), "mp4")}])
    assert status == [200]
    assert answer["faces"]["found_frames"] == 0 and answer["faces"]["sampled_frames"] == 12
    assert answer["faces"]["whole_frame"] is True and "people" not in answer


class _Recorder:
    """Stands in for the model: records its input, returns constant logits."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return torch.zeros(x.shape[0], len(LABELS))


def test_frames_reach_the_model_in_temporal_order(handler, model_dir, monkeypatch):
    """Brightness rises frame by frame: every clip the model gets must rise along dim 2 (T)."""
    n, fps = 30, 10  # 3 s: the overall clip and two timeline windows
    levels = [20 + 7 * t for t in range(n)]
    data = videoutil.encode(flat_clip(levels), "mp4", fps=fps)
    rec = _Recorder()
    monkeypatch.setattr(handler, "model", rec)
    (answer,), status = run(handler, model_dir, [{"body": data}])
    assert status == [200]
    (x,) = rec.inputs
    assert tuple(x.shape) == (3, 1, 16, 48, 48)  # (N, C, T, S, S): overall clip + 2 windows
    grey = ((x * 0.5 + 0.5) * 255).mean(dim=(1, 3, 4))  # (N, T) mean grey level per frame
    want = [sample_indices(n, 16)] + [[lo + i for i in sample_indices(20, 16)] for lo in (0, 10)]
    expected = torch.tensor([[float(levels[i]) for i in clip] for clip in want])
    assert torch.allclose(grey, expected, atol=3.0), (grey, expected)
    assert [(w["start"], w["end"]) for w in answer["timeline"]] == [(0.0, 2.0), (1.0, 3.0)]


@pytest.mark.parametrize("kind", ["gif", "webm", "avi", "mov"])
def test_containers_encoded_here(handler, model_dir, kind):
    face = Image.open(FIXTURES / "face_happy.jpg")
    data = videoutil.encode(videoutil.moving_face(face, n=20, size=96), kind, fps=10)
    (answer,), status = run(handler, model_dir, [{"body": data}])
    assert status == [200], answer
    assert answer["frames"] == 20 and answer["duration"] == pytest.approx(2.0, abs=0.01)
    assert "timeline" not in answer  # not longer than one 2 s window
    check_top3(answer["top3"])


@pytest.mark.parametrize("row", [
    lambda b: {"data": b},                                          # gRPC input / form field "data"
    lambda b: {"video": b},                                         # multipart field "video"
    lambda b: {"body": {"video": base64.b64encode(b).decode()}},   # JSON {"video": b64}
    lambda b: {"body": json.dumps({"data": base64.b64encode(b).decode()}).encode()},  # JSON, no content type
], ids=["data", "video-field", "json-video", "json-bytes"])
def test_body_forms_give_the_same_answer(handler, model_dir, row):
    data = MP4.read_bytes()
    want, _ = run(handler, model_dir, [{"body": data}])
    got, status = run(handler, model_dir, [row(data)])
    assert status == [200] and _same(got[0], want[0])


def test_limits_and_detection_come_from_the_model_config(model_dir):
    h = EmotionVideoHandler()
    opts = {"max_duration_s": 3.0, "detection": "never", "window_seconds": 4.0, "optimize": False}
    h.initialize(make_context(model_dir, 1, opts))
    assert h.pipeline.detector is None and not h.optimized
    ctx = make_context(model_dir, 2, opts)
    out = h.handle([{"body": MP4.read_bytes()}, {"body": MOV.read_bytes()}], ctx)
    assert [ctx.get_response_status(i)[0] for i in range(2)] == [200, 413]
    assert out[0]["faces"] == {"found_frames": 0, "sampled_frames": 16, "whole_frame": True, "detected_frames": 0}
    assert "3 s" in out[1]["message"]


def test_all_requests_bad_still_answers_each(handler, model_dir):
    out, status = run(handler, model_dir, [{"body": b"x"}, {"body": b""}])
    assert status == [415, 400] and [o["code"] for o in out] == [415, 400]


def test_handler_imports_flat_inside_the_archive(model_dir):
    """Inside a .mar the handler and shared modules sit flat in one folder: it must load there."""
    script = f"""
import sys
sys.path.insert(0, {str(model_dir)!r})
sys.path = [p for p in sys.path if p not in ("", {str(Path.cwd())!r}, {str(Path(__file__).resolve().parents[1])!r})]
import video_handler
assert video_handler.video_pipeline.__name__ == "video_pipeline", video_handler.video_pipeline.__name__
assert video_handler.video_pipeline.KeyframeTracker.__module__ == "video_track"
assert "handlers" not in sys.modules
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", script], cwd=model_dir, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_handler_module_defines_one_class():
    """TorchServe refuses a handler module that defines more than one class."""
    import inspect

    from handlers import video_handler

    own = [c for _, c in inspect.getmembers(video_handler, inspect.isclass) if c.__module__ == video_handler.__name__]
    assert own == [EmotionVideoHandler]
