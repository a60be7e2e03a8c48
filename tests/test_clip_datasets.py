"""Clip datasets (training/clip_datasets.py) over real encoded clips and frame folders."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from handlers.preprocess import to_model_input, to_uint8
from handlers.video_decode import decode_video, sample_indices
from model_defs import LABELS, default_spec
from training.clip_datasets import (ClipDataset, MotionConfig, StillClipDataset, afew_list, frames_to_clip,
                                     smooth_path, video_dataset)
from tests.videoutil import encode, moving_face

FIX = Path(__file__).parent / "fixtures" / "video"
SPEC = default_spec("emo_video_hybrid").to_dict()


@pytest.fixture(scope="module")
def faces() -> list[np.ndarray]:
    return moving_face(Image.open(FIX / "face_happy.jpg"), n=24, size=64)


def write_frames(folder: Path, frames: list[np.ndarray]) -> None:
    folder.mkdir(parents=True)
    for t, f in enumerate(frames, 1):  # frame1.png ... frame24.png: natural order matters
        Image.fromarray(f).save(folder / f"frame{t}.png")


def test_frames_to_clip_permutes():
    frames = [torch.full((3, 4, 4), float(t)) + torch.arange(3).view(3, 1, 1) * 100 for t in range(5)]
    clip = frames_to_clip(frames)
    assert clip.shape == (3, 5, 4, 4)
    for t in range(5):
        assert torch.equal(clip[:, t], frames[t])


def test_afew_layout_keeps_frame_order(tmp_path, faces):
    write_frames(tmp_path / "Train" / "clip_a", faces[:16])
    write_frames(tmp_path / "Train" / "clip_b", faces[:5])
    (tmp_path / "train.txt").write_text("Train/clip_a 4\n\n# a comment\nTrain/clip_b 7\n")
    ds = afew_list(tmp_path, tmp_path / "train.txt", SPEC, one_based=True)
    assert len(ds) == 2 and ds.labels == [LABELS.index("happy"), LABELS.index("surprise")]
    clip, label = ds[0]
    assert clip.shape == (1, 16, 48, 48) and clip.dtype == torch.float32
    for t in range(16):  # frame t of the clip is frame t of the folder (frame10 after frame9)
        assert torch.equal(clip[:, t], to_model_input(Image.fromarray(faces[t]), SPEC))
    short, _ = ds[1]  # 5 frames → 16, each repeated in order
    want = [to_model_input(Image.fromarray(faces[i]), SPEC) for i in sample_indices(5, 16)]
    assert all(torch.equal(short[:, t], w) for t, w in enumerate(want))


def test_afew_list_errors(tmp_path):
    (tmp_path / "l.txt").write_text("clip 7\n")
    with pytest.raises(ValueError, match="1-7"):
        afew_list(tmp_path, tmp_path / "l.txt", SPEC)
    (tmp_path / "l.txt").write_text("justapath\n")
    with pytest.raises(ValueError, match="l.txt:1"):
        afew_list(tmp_path, tmp_path / "l.txt", SPEC)


def test_video_files_with_labels_csv(tmp_path, faces):
    kinds = {"a.mp4": ("mp4", "Surprised"), "b.webm": ("webm", "disgusted"), "c.gif": ("gif", "happy"),
             "d.avi": ("avi", "fear"), "e.mov": ("mov", "sad"), "f.mp4": ("mp4", "contempt")}
    rows = ["file,emotion,intensity"]
    for name, (kind, emotion) in kinds.items():
        (tmp_path / name).write_bytes(encode(faces, kind))
        rows.append(f"{name},{emotion},3")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    ds = video_dataset(tmp_path, SPEC)
    assert [s.name for s in ds.sources] == ["a.mp4", "b.webm", "c.gif", "d.avi", "e.mov"]  # contempt skipped
    assert ds.labels == [LABELS.index(x) for x in ("surprise", "disgust", "happy", "fear", "sad")]
    for i in range(len(ds)):
        clip, _ = ds[i]
        assert clip.shape == (1, 16, 48, 48)
    # evaluation: uniform sampling, the decoded frames in order, deterministic
    video = decode_video(tmp_path / "a.mp4", sample_indices(24, 16))
    want = frames_to_clip([to_model_input(f, SPEC) for f in video.frames])
    assert torch.equal(ds[0][0], want) and torch.equal(ds[0][0], ds[0][0])


def test_class_folders_mix_videos_and_frame_folders(tmp_path, faces):
    (tmp_path / "happy").mkdir()
    (tmp_path / "happy" / "x.mp4").write_bytes(encode(faces, "mp4"))
    write_frames(tmp_path / "sad" / "clip1", faces[:8])
    (tmp_path / "unknown").mkdir()
    ds = video_dataset(tmp_path, SPEC)
    assert ds.labels == [LABELS.index("happy"), LABELS.index("sad")]
    assert ds.class_counts()[LABELS.index("sad")] == 1
    assert all(ds[i][0].shape == (1, 16, 48, 48) for i in range(2))


def test_training_samples_random_offsets(tmp_path, faces):
    write_frames(tmp_path / "c", faces)
    ds = ClipDataset([tmp_path / "c"], [3], SPEC, train=True, hflip=False)
    random.seed(0)
    assert len({ds[0][0].sum().item() for _ in range(6)}) > 1
    assert ClipDataset([tmp_path / "c"], [3], SPEC).hflip is False  # evaluation never flips


def test_training_flips_whole_clips(tmp_path, faces):
    write_frames(tmp_path / "c", faces[:16])  # 16 frames into 16 segments: always frames 0..15
    ds = ClipDataset([tmp_path / "c"], [3], SPEC, train=True)
    plain = frames_to_clip([to_model_input(Image.fromarray(f), SPEC) for f in faces[:16]])
    random.seed(0)
    seen = [ds[0][0] for _ in range(12)]
    assert all(torch.equal(c, plain) or torch.equal(c, plain.flip(-1)) for c in seen)
    assert 0 < sum(torch.equal(c, plain) for c in seen) < 12


def test_custom_frame_transform_is_used(tmp_path, faces):
    write_frames(tmp_path / "c", faces[:16])
    calls = []

    def transform(img: Image.Image) -> torch.Tensor:
        calls.append(img.size)
        return torch.zeros(1, 48, 48)

    ds = ClipDataset([tmp_path / "c"], [0], SPEC, frame_transform=transform)
    assert torch.equal(ds[0][0], torch.zeros(1, 16, 48, 48)) and calls == [(64, 64)] * 16


def test_real_labelled_clips_when_present():
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos" / "labelled"
    if not (root / "labels.csv").is_file():
        pytest.skip(f"real clips not found at {root}")
    ds = video_dataset(root, SPEC)
    assert len(ds) == 12 and set(ds.labels) == set(range(7))
    assert ds[0][0].shape == (1, 16, 48, 48)


def still_base() -> list[tuple[torch.Tensor, int]]:
    return [(to_uint8(Image.open(FIX / f"face_{name}.jpg"), SPEC), LABELS.index(name))
            for name in ("happy", "surprise")]


def test_still_clips_move_smoothly():
    torch.manual_seed(0)
    ds = StillClipDataset(still_base(), SPEC, motion=MotionConfig(noise=0.0, hflip=0.0))
    clip, label = ds[1]
    assert clip.shape == (1, 16, 48, 48) and label == LABELS.index("surprise")
    assert clip.min() >= -1 and clip.max() <= 1
    step = (clip[:, 1:] - clip[:, :-1]).abs().mean(dim=(0, 2, 3))  # change from frame to frame
    drift = (clip - clip[:, :1]).abs().mean(dim=(0, 2, 3))  # change from the first frame
    assert step.min() > 0  # every frame moves
    assert step.max() < 0.5 * drift.max()  # smoothly: no jumps (independent jitter would give step ~ drift)


def test_still_clip_without_motion_is_the_still():
    still, _ = still_base()[0]
    ds = StillClipDataset([(still, 3)], SPEC, motion=MotionConfig(0, 0, 0, 0, 0, 0, hflip=0.0))
    clip, _ = ds[0]
    want = (still.float() / 255 - 0.5) / 0.5
    for t in range(16):
        assert torch.allclose(clip[:, t], want, atol=1e-5)


def test_smooth_path():
    g = torch.Generator().manual_seed(0)
    p = smooth_path(16, 3, 0.5, g)
    assert p.shape == (16,) and p.abs().max() <= 0.5
    assert (p[1:] - p[:-1]).abs().max() <= 1.0 * 1.5 / 7.5 + 1e-6  # at most the steepest smoothstep
