"""Bounded video decoding and frame sampling (handlers/video_decode.py) on real encoded clips."""
from __future__ import annotations

import io
import random
from pathlib import Path

import av

import numpy as np
import pytest
from PIL import Image

from handlers.preprocess import InputError
from handlers.video_decode import (VideoLimits, _decode_skipping, decode_frames, decode_video, probe_video,
                                   read_clip, sample_indices, to_rgb, windows)
from tests.videoutil import KINDS, encode, encode_audio, moving_face

FIX = Path(__file__).parent / "fixtures" / "video"


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return moving_face(Image.open(FIX / "face_happy.jpg"), n=20, size=96)


def face_x(img: Image.Image | np.ndarray) -> float:
    """Horizontal centre of the face's (grey, not green) pixels."""
    a = np.asarray(img).astype(int)
    cols = np.nonzero(((a[..., 1] - a[..., 0]) < 100).sum(axis=0) > 4)[0]
    return float(cols.mean())


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_container_decodes_the_right_frames(kind, frames):
    data = encode(frames, kind, fps=10)
    info = probe_video(data)
    assert info.n_frames == 20
    assert info.duration == pytest.approx(2.0, abs=0.02)
    assert info.fps == pytest.approx(10.0, abs=0.1)
    assert info.timestamps[:3] == pytest.approx([0.0, 0.1, 0.2], abs=1e-3)
    video = decode_video(data, [0, 7, 19])
    assert [im.size for im in video.frames] == [(96, 96)] * 3
    assert all(im.mode == "RGB" for im in video.frames)
    assert video.timestamps == pytest.approx([0.0, 0.7, 1.9], abs=1e-3)
    # the face has moved: each decoded frame shows it where the source frame had it
    for im, i in zip(video.frames, video.indices):
        assert face_x(im) == pytest.approx(face_x(frames[i]), abs=2.5)


def test_real_h264_mp4_fixture():
    info = probe_video((FIX / "mead_happy_1s_128.mp4").read_bytes())
    assert (info.codec, info.width, info.height, info.n_frames) == ("h264", 128, 128, 25)
    assert info.duration == pytest.approx(1.0) and info.fps == pytest.approx(25.0)
    video = decode_video(FIX / "mead_happy_1s_128.mp4", sample_indices(info.n_frames, 16))
    assert len(video.frames) == 16 and video.timestamps == sorted(video.timestamps)


def test_real_hevc_mov_fixture():
    info = probe_video(FIX / "face_leaves_hevc_256x144.mov")
    assert (info.codec, info.width, info.height, info.n_frames) == ("hevc", 256, 144, 85)
    got = decode_frames((FIX / "face_leaves_hevc_256x144.mov").read_bytes(), [0, 84])
    assert sorted(got) == [0, 84] and got[84].size == (256, 144)


def test_decode_frames_only_converts_what_is_asked(frames):
    data = encode(frames, "mp4")
    got = decode_frames(data, [5, 2, 5])
    assert sorted(got) == [2, 5]
    past_end = decode_frames(data, [3, 30])  # e.g. planned on a stream that turns out shorter
    last = decode_frames(data, [19])[19]
    assert sorted(past_end) == [3, 30] and np.array_equal(np.asarray(past_end[30]), np.asarray(last))


def test_display_rotation_is_applied():
    frame = np.full((32, 64, 3), 100, np.uint8)
    frame[:8, :8] = 255  # white mark top-left
    video = decode_video(encode([frame] * 3, "mp4", rotation=90))
    img = np.asarray(video.frames[0])
    assert img.shape[:2] == (64, 32)  # turned upright (90 degrees counter-clockwise)
    assert img[-8:, :8].mean() > 200 and img[:8, :8].mean() < 160  # the mark went to the bottom-left


@pytest.mark.parametrize("data,status,words", [
    (b"", 400, "empty"),
    (b"this is not a video at all " * 20, 415, "not a supported video container"),
    (encode_audio("wav", "pcm_s16le"), 415, "not a supported video container"),
    (encode_audio("mp4", "aac"), 422, "no video stream"),
])
def test_unusable_data_is_refused_with_its_status(data, status, words):
    with pytest.raises(InputError) as e:
        decode_video(data)
    assert e.value.status == status and words in str(e.value)


def test_truncated_and_corrupt_clips(frames):
    data = encode(frames, "mp4")
    with pytest.raises(InputError) as e:  # MP4 index (moov) is at the end: cut off
        probe_video(data[: len(data) // 2])
    assert e.value.status == 400 and "corrupt or truncated MP4/MOV" in str(e.value)
    scrambled = bytearray(data)
    scrambled[64::7] = bytes(b ^ 0x5A for b in scrambled[64::7])
    with pytest.raises(InputError) as e:  # the index is garbage: unreadable, or no track left in it
        decode_video(bytes(scrambled))
    assert e.value.status in (400, 422) and "corrupt" in str(e.value)


def test_truncated_gif_keeps_the_frames_it_has(frames):
    data = encode(frames, "gif")
    video = decode_video(data[: len(data) * 2 // 3])
    assert 5 < len(video.frames) < 20


@pytest.mark.parametrize("kind,words", [("avi", "no frames"), ("mp4", "no video stream")])
def test_zero_frames(kind, words):
    with pytest.raises(InputError) as e:  # headers only (an MP4 without samples has no track at all)
        probe_video(encode([], kind, size=(32, 32)))
    assert e.value.status == 422 and words in str(e.value)


@pytest.mark.parametrize("limits,words", [
    (VideoLimits(max_bytes=1000), "too large"),
    (VideoLimits(max_frames=10), "more than 10 frames"),
    (VideoLimits(max_duration_s=1.0), "more than 1 s"),
    (VideoLimits(max_pixels=64 * 64), "frames too large: 96x96"),
])
def test_limits(limits, words, frames):
    with pytest.raises(InputError) as e:
        decode_video(encode(frames, "mp4"), limits=limits)
    assert e.value.status == 413 and words in str(e.value)


def test_limits_from_config():
    lim = VideoLimits.from_mapping({"max_frames": "50", "max_duration_s": 10, "unknown": 1, "max_bytes": None})
    assert lim.max_frames == 50 and lim.max_duration_s == 10.0 and lim.max_bytes == VideoLimits().max_bytes


def test_sample_indices():
    assert sample_indices(32, 16) == list(range(1, 32, 2))
    assert sample_indices(4, 8) == [0, 0, 1, 1, 2, 2, 3, 3]  # short clips repeat frames, in order
    assert sample_indices(1, 16) == [0] * 16
    rng = random.Random(0)
    draws = [sample_indices(100, 16, "random", rng) for _ in range(20)]
    for d in draws:
        assert d == sorted(d) and all(100 * i // 16 <= j < 100 * (i + 1) // 16 + 1 for i, j in enumerate(d))
    assert len({tuple(d) for d in draws}) > 1
    with pytest.raises(ValueError):
        sample_indices(0, 16)


def test_windows_cover_the_timeline():
    ts = [i / 25 for i in range(250)]  # 10 s at 25 fps
    ws = windows(ts, window_seconds=4.0, stride=2.0)
    assert [(w.start, w.end) for w in ws] == [(0, 4), (2, 6), (4, 8), (6, 10)]
    for w in ws:
        assert len(w.indices) == 16 and w.indices == sorted(w.indices)
        assert all(w.start <= ts[i] < w.end for i in w.indices)
    tail = windows(ts[:225], 4.0, 3.0)  # 9 s: 0-4, 3-7, then one aligned to the end
    assert [(w.start, w.end) for w in tail] == [(0, 4), (3, 7), (5, 9)]
    one = windows(ts[:50], 4.0, 2.0)
    assert len(one) == 1 and one[0].end == pytest.approx(2.0)
    slow = windows([0.0, 3.0, 6.0], 1.0, 1.0, clip_len=4)  # a slow GIF: windows between frames
    assert slow[1].indices == [0, 0, 0, 0] and slow[3].indices == [1, 1, 1, 1]


def _pixels(frames: dict[int, Image.Image]) -> dict[int, np.ndarray]:
    return {i: np.asarray(im) for i, im in sorted(frames.items())}


@pytest.mark.parametrize("path", ["mead_happy_1s_128.mp4", "face_leaves_hevc_256x144.mov"])
def test_skipping_unwanted_frames_gives_the_full_decodes_pixels(path):
    """H.264/HEVC: with the probe's pts, the unwanted non-reference frames are skipped, and the
    wanted frames come out pixel for pixel as when every frame is decoded."""
    data = (FIX / path).read_bytes()
    info = probe_video(data)
    assert len(info.pts) == info.n_frames and info.pts == sorted(info.pts)
    wanted = sample_indices(info.n_frames, 7)
    skipping = _decode_skipping(data, sorted(set(wanted)), VideoLimits(), info.pts)
    assert skipping is not None  # the skipping path answered, no fallback
    full = _pixels(decode_frames(data, wanted))  # no pts: every frame decoded, counted
    assert list(full) == sorted(set(wanted))
    assert all(np.array_equal(a, b) for a, b in zip(full.values(), _pixels(skipping).values()))
    assert all(np.array_equal(full[i], np.asarray(im)) for i, im in zip(wanted, read_clip(data, lambda _: wanted).frames))


def test_skipping_falls_back_to_decoding_every_frame(frames):
    data = encode(frames, "mp4")
    info = probe_video(data)
    full = _pixels(decode_frames(data, [2, 9, 19]))
    wrong = [p + 1 for p in info.pts]  # pts that no frame has: the skipping path gives up
    assert _decode_skipping(data, [2, 9, 19], VideoLimits(), wrong) is None
    assert all(np.array_equal(full[i], a) for i, a in _pixels(decode_frames(data, [2, 9, 19], pts=wrong)).items())
    vp9 = encode(frames, "webm")  # not a skipping codec: every frame decoded
    assert _decode_skipping(vp9, [3], VideoLimits(), probe_video(vp9).pts) is None


def test_to_rgb_is_to_image(frames):
    data = encode(frames, "mov")
    with av.open(io.BytesIO(data)) as container:
        frame = next(container.decode(video=0))
        assert np.array_equal(np.asarray(to_rgb(frame)), np.asarray(frame.to_image()))


@pytest.mark.parametrize("path", ["mead_happy_1s_128.mp4", "face_leaves_hevc_256x144.mov"])
def test_deblocking_is_a_setting_and_off_moves_pixels_little(path):
    """``deblock`` (``VIDEO_DEFAULTS``): off, H.264/HEVC skip the in-loop filter, so frames differ
    from the filtered decode, but by a few grey levels on average; auto filters these small clips."""
    data = (FIX / path).read_bytes()
    wanted = sample_indices(probe_video(data).n_frames, 7)
    on = _pixels(decode_frames(data, wanted, VideoLimits(deblock="on")))
    off = _pixels(decode_frames(data, wanted, VideoLimits(deblock="off")))
    auto = _pixels(decode_frames(data, wanted, VideoLimits()))
    assert all(np.array_equal(on[i], auto[i]) for i in on)
    diffs = [float(np.abs(on[i].astype(int) - off[i].astype(int)).mean()) for i in on]
    assert max(diffs) > 0  # the setting reaches the decoder
    assert max(diffs) < 3.0


def test_deblocking_modes():
    assert VideoLimits().deblock == "auto"
    assert VideoLimits().deblocks(1280, 720) and not VideoLimits().deblocks(1920, 1080)
    assert VideoLimits(deblock="on").deblocks(3840, 2160) and not VideoLimits(deblock="off").deblocks(64, 64)
    assert VideoLimits.from_mapping({"deblock": True}).deblock == "on"  # YAML's `deblock: on`
    assert VideoLimits.from_mapping({"deblock": False}).deblock == "off"
    with pytest.raises(ValueError, match="deblock"):
        VideoLimits.from_mapping({"deblock": "sometimes"})
