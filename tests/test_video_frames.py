"""The per-frame video model: built from an image checkpoint, served by the video handler with
keyframe tracking, per-person answers and pooling, on real encoded clips (no server)."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from export.__main__ import main as export_main
from export.torchscript import load_scripted
from handlers.video_handler import EmotionVideoHandler
from handlers.video_pool import pool
from model_defs import LABELS, ModelSpec, create_model, load_checkpoint, load_model, save_weights
from tests import videoutil
from tests.handler_context import make_context, run_handler as run
from training.video_task import clip_probs
from training.video_from_image import build

FIXTURES = Path(__file__).parent / "fixtures"
MP4 = FIXTURES / "video" / "mead_happy_1s_128.mp4"
GROUP = FIXTURES / "photos" / "group.jpg"  # four faces (and one in profile in the background)
GROUP_FIRST_FACE = [713, 280, 764, 352]  # README: the first face's box in the photo


def image_checkpoint(path: Path, arch: str = "emo_resnet_s", **extra) -> Path:
    torch.manual_seed(0)
    model = create_model(arch)
    model.spec.extra.update(extra)
    save_weights(model, path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An extracted emotion_video.mar of a per-frame model (random image weights, window pooling)."""
    tmp = tmp_path_factory.mktemp("fmar")
    video = build(image_checkpoint(tmp / "image.pth"), tmp / "video.pth", pooling="window")
    assert export_main(["--task", "video", "--checkpoint", str(video), "--out", str(tmp)]) == 0
    with zipfile.ZipFile(tmp / "emotion_video.mar") as z:
        z.extractall(tmp / "model")
    return tmp / "model"


@pytest.fixture(scope="module")
def handler(model_dir) -> EmotionVideoHandler:
    h = EmotionVideoHandler()
    h.initialize(make_context(model_dir, 1))
    return h


def test_video_spec_comes_from_the_image_checkpoint(tmp_path):
    """Arch, input size, mean/std and calibration extras are the image checkpoint's, never hard-coded."""
    bias = [0.2, -0.1, 0.6, -0.2, -0.6, 0.2, -0.1]
    img = image_checkpoint(tmp_path / "img.pth", "emo_mobilenet_v2", temperature=1.7, class_bias=bias)
    out = build(img, tmp_path / "video.pth", pooling="peak", pooling_params={"window": 0.3}, sample_fps=5)
    ck, ick = load_checkpoint(out), load_checkpoint(img)
    spec, ispec = ModelSpec.from_dict(ck["spec"]), ModelSpec.from_dict(ick["spec"])
    assert (spec.task, spec.arch) == ("video", "emo_video_frames")
    assert spec.extra["frame_arch"] == "emo_mobilenet_v2" and spec.extra["temperature"] == 1.7
    assert spec.extra["class_bias"] == bias
    assert (spec.input_size, spec.channels, spec.mean, spec.std) == (ispec.input_size, ispec.channels, ispec.mean, ispec.std)
    assert spec.extra["pooling"] == "peak" and spec.extra["pooling_params"]["window"] == 0.3
    assert spec.extra["sample_fps"] == 5 and spec.extra["input_shape"] == [1, ispec.input_size, ispec.input_size]
    assert ck["state_dict"].keys() == ick["state_dict"].keys()
    assert all(torch.equal(ck["state_dict"][k], ick["state_dict"][k]) for k in ick["state_dict"])
    with pytest.raises(ValueError, match="pooling"):
        build(img, tmp_path / "bad.pth", pooling="median")


def test_exported_model_scores_frames_as_the_image_model(model_dir, tmp_path):
    scripted, spec = load_scripted(next(model_dir.glob("*.pt")))
    image = create_model("emo_resnet_s")
    image.load_state_dict(load_checkpoint(model_dir.parent / "image.pth")["state_dict"])
    x = torch.randn(5, 1, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.allclose(scripted(x), image.eval()(x), atol=1e-4)


class _Recorder:
    """Stands in for the model: records its input; logits from each crop's mean brightness."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        level = x.mean(dim=(1, 2, 3))  # (N,)
        logits = torch.stack([torch.cos(level * (k + 1)) * 3 for k in range(len(LABELS))], 1)
        self.outputs.append(logits)
        return logits


def test_each_crop_is_scored_once_and_clips_are_pooled_from_frames(handler, model_dir, monkeypatch):
    """A 3 s clip of rising brightness (no face): the model sees each sampled frame once, and
    the overall answer and each window are the spec's pooling of those frames' probabilities."""
    n, fps = 30, 10
    levels = [20 + 7 * t for t in range(n)]
    data = videoutil.encode([np.full((64, 64, 3), v, np.uint8) for v in levels], "mp4", fps=fps)
    rec = _Recorder()
    monkeypatch.setattr(handler, "model", rec)
    (answer,), status = run(handler, model_dir, [{"body": data}])
    assert status == [200]
    (x,) = rec.inputs
    sampled = answer["faces"]["sampled_frames"]
    assert tuple(x.shape) == (sampled, 1, 48, 48) and sampled == 18  # 3 s at 6 frames/s, each once
    grey = ((x * 0.5 + 0.5) * 255).mean(dim=(1, 2, 3))
    assert (grey[1:] > grey[:-1]).all()  # in temporal order
    probs = torch.softmax(rec.outputs[0], 1)
    want = pool(probs, LABELS, "window")
    assert [t["label"] for t in answer["top3"]] == [LABELS[i] for i in want.topk(3).indices.tolist()]
    assert answer["top3"][0]["probability"] == pytest.approx(want.max().item(), abs=1e-5)
    assert [(w["start"], w["end"]) for w in answer["timeline"]] == [(0.0, 2.0), (1.0, 3.0)]
    first = pool(probs[:12], LABELS, "window")  # frames shown in the first 2 s
    assert answer["timeline"][0]["top3"][0]["probability"] == pytest.approx(first.max().item(), abs=1e-5)


def group_pan(n: int = 40, fps: int = 10) -> tuple[bytes, list[int]]:
    """A 4 s camera pan over the four-face group photo: 760x430 frames moving 1 px per frame.
    Returns the video and the x offset of each frame."""
    photo = Image.open(GROUP).convert("RGB")
    offsets = [t * (photo.width - 760) // (n - 1) for t in range(n)]
    frames = [np.asarray(photo.crop((x, 10, x + 760, 440))) for x in offsets]
    return videoutil.encode(frames, "mp4", fps=fps), offsets


def test_several_faces_are_tracked_as_separate_people(handler, model_dir):
    """Four faces in full view, and a fifth in profile in the background that the detector finds
    on some frames only: the four are tracked throughout, the fifth (if kept) comes last."""
    data, offsets = group_pan()
    (answer,), status = run(handler, model_dir, [{"body": data}])
    assert status == [200], answer
    people = answer["people"]
    assert len(people) in (4, 5)
    faces = answer["faces"]
    assert faces["detected_frames"] < faces["sampled_frames"] == 24  # keyframes, not every frame
    boxes = [p["box"] for p in people[:4]]
    for i, a in enumerate(boxes):  # different places (the one in profile is partly behind another)
        for b in boxes[i + 1:]:
            assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1])
    # the README's first face, in frame coordinates (the pan moves it left by the mean offset)
    shift = sum(offsets) / len(offsets)
    want = [GROUP_FIRST_FACE[0] - shift, GROUP_FIRST_FACE[1] - 10]
    assert any(abs(b[0] - want[0]) < 15 and abs(b[1] - want[1]) < 15 for b in boxes), (boxes, want)
    for p in people[:4]:  # all four are there throughout (one is cut by the frame edge at the start)
        assert p["found_frames"] >= 20 and p["start"] <= 0.5 and p["end"] >= 3.5
        assert len(p["top3"]) == 3 and len(p["timeline"]) == len(answer["timeline"]) == 2
    for p in people[4:]:  # the face in profile: small, behind the others
        assert p["found_frames"] < 20 and (p["box"][2] - p["box"][0]) < 30 and 1 <= len(p["timeline"]) <= 2
    assert people[0]["top3"] == answer["top3"]  # the main person answers for the video
    assert answer["faces"]["found_frames"] == people[0]["found_frames"]


def test_detection_on_every_frame_when_configured(model_dir):
    h = EmotionVideoHandler()
    h.initialize(make_context(model_dir, 1, {"keyframe_every": 1, "optimize": False}))
    (answer,), status = run(h, model_dir, [{"body": MP4.read_bytes()}])
    assert status == [200]
    assert answer["faces"]["detected_frames"] == answer["faces"]["sampled_frames"] == 16


def test_bad_requests_fail_alone_with_the_frame_model(handler, model_dir):
    good = MP4.read_bytes()
    rows = [{"body": good}, {"body": good[: len(good) // 3]}, {"body": b"\x00" * 1000},
            {"body": videoutil.encode_audio("mp4", "aac")}, {"body": group_pan()[0]}]
    out, status = run(handler, model_dir, rows)
    assert status == [200, 400, 415, 422, 200]
    alone, _ = run(handler, model_dir, [{"body": good}])
    assert out[0]["top3"] == alone[0]["top3"] and 4 <= len(out[4]["people"]) <= 5


def test_sdk_clip_probabilities_pool_the_frames_as_served(tmp_path):
    """training.video_task.clip_probs (the SDK's video path): a per-frame model's clip answer is
    the spec's pooling of its frames' probabilities; a clip model's is its own output."""
    video = load_model(build(image_checkpoint(tmp_path / "image.pth"), tmp_path / "video.pth", pooling="peak"))
    clips = torch.randn(2, 1, 16, 48, 48, generator=torch.Generator().manual_seed(3))
    got = clip_probs(video, clips)
    with torch.inference_mode():
        for n in range(2):
            frames = torch.softmax(video(clips[n].permute(1, 0, 2, 3)), -1)
            assert torch.allclose(got[n], pool(frames, LABELS, "peak"), atol=1e-5)
    hybrid = create_model("emo_video_hybrid").eval()
    with torch.inference_mode():
        assert torch.allclose(clip_probs(hybrid, clips), torch.softmax(hybrid(clips), -1), atol=1e-5)
