"""Hostile and odd-but-valid request bodies, generated in memory (nothing large is committed).

Each entry is ``(name, body)``; bodies are bytes, or a dict sent as JSON. Used by
``tests/test_hostile_input.py`` and the load tests.
"""
from __future__ import annotations

import base64
import io
import math
import random
import struct
import wave
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from handlers.contract import VIDEO_DEFAULTS
from tests import videoutil

FIXTURES = Path(__file__).parent / "fixtures"
FACE = FIXTURES / "faces" / "happy" / "PublicTest_10527411.jpg"
VIDEO_FACE = FIXTURES / "video" / "face_happy.jpg"


def face_image(size: int = 96) -> Image.Image:
    """A real face (a FER2013 crop), RGB, scaled to ``size``."""
    return Image.open(FACE).convert("RGB").resize((size, size), Image.BILINEAR)


def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_bomb(side: int = 30_000) -> bytes:
    """A valid PNG of ``side`` x ``side`` 1-bit pixels, all zero: ~100 KB on disk, 900 MP decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + math.ceil(side / 8))  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def big_jpeg(side: int = 8000) -> bytes:
    """A real ``side`` x ``side`` greyscale JPEG (flat with a gradient: a few hundred KB)."""
    ramp = np.linspace(0, 255, side, dtype=np.float32).astype(np.uint8)
    arr = np.broadcast_to(ramp, (side, side))
    return encode(Image.fromarray(np.ascontiguousarray(arr), "L"), "JPEG", quality=50)


def wav_audio(seconds: float = 0.5, rate: int = 16000) -> bytes:
    """A mono 16-bit PCM WAV file (a sine tone)."""
    t = np.arange(int(rate * seconds)) / rate
    pcm = (np.sin(2 * np.pi * 440 * t) * 10000).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def face_video(n: int = 20, fps: int = 10, size: int = 96) -> bytes:
    """A short MP4 of a real face sliding over a green background."""
    return videoutil.encode(videoutil.moving_face(Image.open(VIDEO_FACE), n=n, size=size), "mp4", fps=fps)


def no_face_video(n: int = 20, fps: int = 10, size: int = 96) -> bytes:
    """An MP4 of smooth noise-free colour gradients: nothing face-like in it."""
    frames = []
    for t in range(n):
        x = np.linspace(0, 255, size, dtype=np.float32)
        r = np.broadcast_to((x + 10 * t) % 256, (size, size))
        g = np.broadcast_to(x[:, None], (size, size))
        b = np.full((size, size), 128.0)
        frames.append(np.stack([r, g, b], -1).astype(np.uint8))
    return videoutil.encode(frames, "mp4", fps=fps)


def long_video(seconds: int, fps: int = 1, size: int = 32) -> bytes:
    """An MP4 lasting ``seconds`` at ``fps`` of tiny flat frames (small file, long timeline)."""
    frames = [np.full((size, size, 3), (t * 7) % 256, np.uint8) for t in range(seconds * fps)]
    return videoutil.encode(frames, "mp4", fps=fps)


def image_hostile(rng: random.Random | None = None) -> dict[str, Any]:
    """Bodies the image model must refuse with a 4xx."""
    rng = rng or random.Random(0)
    jpeg = encode(face_image(), "JPEG", quality=90)
    png = encode(face_image(), "PNG")
    mp4 = face_video()
    return {
        "empty": b"",
        "one_byte": b"\xff",
        "random_bytes": bytes(rng.getrandbits(8) for _ in range(4096)),
        "text": b"hello, this is plain text and not an image\n" * 20,
        "html": b"<!DOCTYPE html><html><head><title>x</title></head><body><img src=x onerror=alert(1)></body></html>",
        "truncated_jpeg": jpeg[: len(jpeg) // 3],
        "truncated_png": png[: len(png) // 3],
        "truncated_mp4": mp4[: len(mp4) // 3],
        "jpeg_header_only": jpeg[:2],
        "png_bomb_30000x30000": png_bomb(),
        "jpeg_8000x8000": big_jpeg(),
        "json_base64_junk": {"data": "!!!this is *not* base64@@@"},
        "json_base64_of_junk_bytes": {"data": base64.b64encode(b"\x00junk" * 100).decode()},
        "json_without_payload": {"something": "else", "other": 1},
        "json_null_payload": {"data": None},
        "video_to_image_model": mp4,
        "wav_audio": wav_audio(),
    }


def odd_valid_images() -> dict[str, bytes]:
    """Unusual but valid images: the image model answers them (or refuses with a clean 4xx)."""
    face = face_image()
    rgba = face.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(face.size))
    grey16 = Image.fromarray(np.asarray(face.convert("L"), dtype=np.uint16) * 257)  # mode I;16
    frames = [face, face.transpose(Image.Transpose.FLIP_LEFT_RIGHT), face.rotate(10)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    return {
        "rgba_png": encode(rgba, "PNG"),
        "grey16_png": encode(grey16, "PNG"),
        "cmyk_jpeg": encode(face.convert("CMYK"), "JPEG", quality=90),
        "palette_png": encode(face.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "palette_transparent_gif": encode(face.convert("P", palette=Image.Palette.ADAPTIVE), "GIF", transparency=0),
        "animated_gif": gif.getvalue(),
        "exif_rotated_jpeg": encode(face.rotate(90, expand=True), "JPEG", quality=90, exif=exif),
        "one_pixel_png": encode(Image.new("RGB", (1, 1), (200, 150, 120)), "PNG"),
        "greyscale_jpeg": encode(face.convert("L"), "JPEG"),
        "webp": encode(face, "WEBP"),
        "bmp": encode(face, "BMP"),
        "tiff": encode(face, "TIFF"),
    }


def video_hostile(rng: random.Random | None = None,
                  max_duration_s: float = VIDEO_DEFAULTS["max_duration_s"]) -> dict[str, Any]:
    """Bodies the video model must refuse with a 4xx."""
    rng = rng or random.Random(1)
    mp4 = face_video()
    jpeg = encode(face_image(), "JPEG", quality=90)
    png = encode(face_image(), "PNG")
    return {
        "empty": b"",
        "one_byte": b"\x00",
        "random_bytes": bytes(rng.getrandbits(8) for _ in range(4096)),
        "text": b"hello, this is plain text and not a video\n" * 20,
        "html": b"<!DOCTYPE html><html><body><video src=x></video></body></html>",
        "truncated_mp4_header": mp4[:200],
        "truncated_mp4": mp4[: len(mp4) // 3],
        "truncated_jpeg": jpeg[: len(jpeg) // 3],
        "truncated_png": png[: len(png) // 3],
        "image_to_video_model": jpeg,
        "png_to_video_model": png,
        "wav_audio": wav_audio(),
        "audio_only_mp4": videoutil.encode_audio("mp4", "aac"),
        "json_base64_junk": {"data": "%%% not base64 %%%"},
        "json_base64_of_junk_bytes": {"data": base64.b64encode(b"\x01junk" * 100).decode()},
        "over_duration_limit": long_video(int(max_duration_s) + 10),
    }


def video_odd_valid() -> dict[str, bytes]:
    """Valid videos with little in them: a proper answer or a clean 4xx (e.g. 422 no face)."""
    face = Image.open(VIDEO_FACE).convert("RGB").resize((96, 96))
    return {
        "one_frame": videoutil.encode([np.asarray(face)], "mp4", fps=10),
        "no_face": no_face_video(),
        "truncated_second_half": face_video(n=40)[: int(len(face_video(n=40)) * 0.7)],
    }
