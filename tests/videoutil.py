"""Encode small test videos in memory with PyAV (shared by the video tests)."""
from __future__ import annotations

import io
from fractions import Fraction
from typing import Sequence

import av
import numpy as np
from PIL import Image

# container format, codec, pixel format for each supported kind of upload
KINDS = {
    "mp4": ("mp4", "libx264", "yuv420p"),
    "mov": ("mov", "libx265", "yuv420p"),
    "webm": ("webm", "libvpx-vp9", "yuv420p"),
    "avi": ("avi", "mpeg4", "yuv420p"),
    "gif": ("gif", "gif", "rgb8"),
}


def encode(frames: Sequence[np.ndarray | Image.Image], kind: str = "mp4", fps: int = 10,
           rotation: int | None = None, size: tuple[int, int] | None = None) -> bytes:
    """Encode RGB frames (HxWx3 uint8 arrays or PIL images, even sizes) into ``kind``'s container.

    ``size`` (width, height) defaults to the first frame's; give it to encode no frames at all.
    """
    fmt, codec, pix = KINDS[kind]
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        if size is None:
            size = np.asarray(frames[0]).shape[1::-1]
        stream = out.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height = size
        stream.pix_fmt = pix
        if codec == "libx265":
            stream.options = {"x265-params": "log-level=error"}
        if rotation is not None:
            stream.set_display_rotation(rotation)
        out.start_encoding()  # writes the header even when there are no frames
        for f in frames:
            frame = av.VideoFrame.from_ndarray(np.asarray(f.convert("RGB") if isinstance(f, Image.Image) else f),
                                               format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def encode_audio(fmt: str = "mp4", codec: str = "aac", seconds: float = 0.5) -> bytes:
    """A file with an audio stream only (a sine tone)."""
    rate = 16000
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        t = np.arange(int(rate * seconds)) / rate
        pcm = (np.sin(2 * np.pi * 440 * t) * 0.3).astype(np.float32)[None]
        fmt_in = "fltp" if codec == "aac" else "s16"
        if fmt_in == "s16":
            pcm = (pcm * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm, format=fmt_in, layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def moving_face(face: Image.Image, n: int = 20, size: int = 96,
                background: tuple[int, int, int] = (0, 255, 0)) -> list[np.ndarray]:
    """``n`` frames of ``face`` (scaled to half of ``size``) sliding left to right over ``background``
    (green by default: a colour no grey face pixel has, and exact in GIF's 8-bit palette)."""
    face = face.convert("RGB").resize((size // 2, size // 2))
    frames = []
    for t in range(n):
        canvas = Image.new("RGB", (size, size), background)
        x = int(round(t * (size - face.width) / max(n - 1, 1)))
        canvas.paste(face, (x, size // 4))
        frames.append(np.asarray(canvas))
    return frames
