"""Bounded video decoding with PyAV, and the frame sampling shared by serving and training.

Two passes over the encoded data: :func:`probe_video` demuxes packets only (no decoding) to learn
the frame count and timestamps and to enforce the limits; :func:`decode_frames` then decodes up
to the last frame asked for (for H.264 and HEVC skipping the non-reference frames not asked for)
and converts only the asked-for frames to PIL images.
:func:`decode_video` does both. Errors are :class:`~handlers.preprocess.InputError` with the HTTP
status to answer: 400 corrupt data, 413 over a limit, 415 not a supported container, 422 a
container without usable video.
"""
from __future__ import annotations

import functools
import io
import logging
import bisect
import math
import os
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Sequence, Union

from PIL import Image

if TYPE_CHECKING:
    import av

try:  # inside the repository (package import)
    from .common import usable_cpus
    from .contract import VIDEO_DEFAULTS
    from .preprocess import InputError
except ImportError:  # inside a .mar the shared modules sit flat beside the handler
    from common import usable_cpus  # type: ignore[no-redef]
    from contract import VIDEO_DEFAULTS  # type: ignore[no-redef]
    from preprocess import InputError  # type: ignore[no-redef]

log = logging.getLogger(__name__)


def _av():
    """PyAV, imported on first use: what imports this module (the training engine) also runs
    where only images are decoded and PyAV is not installed, such as an accelerator machine."""
    import av
    return av

VideoSource = Union[bytes, bytearray, memoryview, str, os.PathLike]

# Demuxers we accept (FFmpeg names): MP4/MOV/3GP, Matroska/WebM, AVI, GIF. Anything else is
# refused before any demuxer parses it (a smaller attack surface than FFmpeg's full list).
ALLOWED_FORMATS = ("mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "avi", "gif")
SUPPORTED = "MP4, MOV, WebM/MKV, AVI, GIF"


@dataclass(frozen=True)
class VideoLimits:
    """Bounds on the work one video may cause; all configurable (e.g. from ``model-config.yaml``),
    by default the served ones (``contract.VIDEO_DEFAULTS``)."""

    max_bytes: int = VIDEO_DEFAULTS["max_bytes"]  # encoded size
    max_duration_s: float = VIDEO_DEFAULTS["max_duration_s"]  # stream duration
    max_frames: int = VIDEO_DEFAULTS["max_frames"]  # frames in the stream (all are demuxed, most are decoded)
    max_pixels: int = VIDEO_DEFAULTS["max_pixels"]  # per frame
    # not a bound but the decoder's one quality setting, H.264/HEVC's in-loop deblocking filter:
    # "on", "off" (:data:`NO_DEBLOCKING`) or "auto" (:meth:`deblocks`)
    deblock: str = VIDEO_DEFAULTS["deblock"]

    def __post_init__(self) -> None:
        if self.deblock not in DEBLOCK_MODES:
            raise ValueError(f"deblock: {self.deblock!r} is not one of {', '.join(DEBLOCK_MODES)}")

    def deblocks(self, width: int, height: int) -> bool:
        """Whether frames of this size are deblocked: "auto" up to :data:`DEBLOCK_AUTO_MAX_PIXELS`."""
        if self.deblock == "auto":
            return width * height <= DEBLOCK_AUTO_MAX_PIXELS
        return self.deblock == "on"

    @classmethod
    def from_mapping(cls, cfg: dict | None) -> "VideoLimits":
        """Build from a config mapping, ignoring unknown keys and ``None`` values."""
        cfg = cfg or {}
        kw = {k: _as_type(getattr(cls, k), v) for k, v in cfg.items()
              if k in cls.__dataclass_fields__ and v is not None}
        return cls(**kw)


def _as_type(default: object, value: object) -> object:
    """``value`` as the type of ``default``; YAML's booleans (``deblock: on``) as "on"/"off"."""
    if isinstance(default, str) and isinstance(value, bool):
        return "on" if value else "off"
    return type(default)(value)


DEBLOCK_MODES = ("auto", "on", "off")

DEBLOCK_AUTO_MAX_PIXELS = 1280 * 720
"""``deblock: auto`` filters frames up to 720p and skips the filter above, where it costs most:
on the 4 s 1080p street clip the filter is a fifth or more of decoding (in the video handler,
medians of 10: 296 ms without it against 348 with it). Its answers hardly move (mean change of a
class probability 0.005 on the 12 labelled 256x256 clips), but one of them, already close between
sad and neutral, flips, so small videos keep the exact decode."""

NO_DEBLOCKING = {"skip_loop_filter": "all"}
"""Decoder options that skip the in-loop deblocking filter of H.264/HEVC. The pixels move by about
2 grey levels on average (the block edges the filter would smooth, drifting until the next
keyframe); both decoding paths use the same setting, so they still agree."""


FRAME_THREADS_FROM_CPUS = 4
"""FFmpeg decodes several frames at once (frame threads) only where the process may use at least
this many CPUs; below, slice threads only. On this project's 2 cores frame threads cost more than
they give: the 24 sampled frames of the 4 s 1080p clip decoded in 233 ms with slice threads (one
thread for x264's one-slice frames) against 283 ms with frame threads (medians of 10 in the video
handler, the loop filter off; the clip's answer took 363 against 417 ms). Not measured above 2."""


@functools.lru_cache(maxsize=1)
def _thread_type() -> str:
    """FFmpeg's thread type for this process (:data:`FRAME_THREADS_FROM_CPUS`), decided once."""
    return "AUTO" if usable_cpus() >= FRAME_THREADS_FROM_CPUS else "SLICE"


def _prepare_decoder(stream: av.video.stream.VideoStream, limits: VideoLimits) -> None:
    """Threads (:func:`_thread_type`) and the deblocking setting of ``limits``, before the first packet."""
    stream.thread_type = _thread_type()
    ctx = stream.codec_context
    if not limits.deblocks(ctx.width, ctx.height):
        ctx.options = dict(NO_DEBLOCKING)


@dataclass
class VideoInfo:
    """What :func:`probe_video` learns without decoding."""

    format: str
    codec: str
    width: int
    height: int
    n_frames: int
    timestamps: list[float]  # seconds from the first frame, presentation order
    duration: float  # seconds, first frame start to last frame end
    fps: float
    pts: list[int] = field(default_factory=list)  # the packets' own pts, sorted; empty unless every packet had one


@dataclass
class DecodedVideo:
    """Frames (RGB, upright) with their indices into the stream and timestamps in seconds."""

    info: VideoInfo
    indices: list[int]
    frames: list[Image.Image]
    timestamps: list[float]

    @property
    def fps(self) -> float:
        return self.info.fps

    @property
    def duration(self) -> float:
        return self.info.duration


@dataclass
class Window:
    """A stretch of the timeline and the frame indices sampled from it."""

    start: float
    end: float
    indices: list[int]


def _open(source: VideoSource, limits: VideoLimits) -> av.container.InputContainer:
    if isinstance(source, (bytes, bytearray, memoryview)):
        size = len(source)
        fileobj: object = io.BytesIO(bytes(source))
    else:
        size = os.path.getsize(source)
        fileobj = os.fspath(source)
    if size == 0:
        raise InputError("empty request body: expected an encoded video", 400)
    if size > limits.max_bytes:
        raise InputError(f"video too large: {size} bytes (limit {limits.max_bytes} bytes)", 413)
    try:
        return _av().open(fileobj, options={"format_whitelist": ",".join(ALLOWED_FORMATS)})
    except _av().error.FFmpegError as e:
        kind = _sniff(source if isinstance(source, (bytes, bytearray, memoryview)) else _head(fileobj))
        if kind:
            raise InputError(f"cannot decode video: corrupt or truncated {kind} data", 400) from e
        raise InputError(f"cannot decode video: not a supported video container ({SUPPORTED})", 415) from e


def _head(path: object) -> bytes:
    with open(path, "rb") as f:  # type: ignore[arg-type]
        return f.read(16)


def _sniff(data: bytes | bytearray | memoryview) -> str | None:
    """The container a file's first bytes announce, if it is one we support."""
    head = bytes(data[:16])
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"):
        return "MP4/MOV"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "AVI"
    if head[:4] == b"\x1aE\xdf\xa3":
        return "WebM/MKV"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return None


def _video_stream(container: av.container.InputContainer, limits: VideoLimits) -> av.video.stream.VideoStream:
    if not container.streams.video:
        found = ", ".join(s.type for s in container.streams) or "none: empty or corrupt"
        raise InputError(f"no video stream in the {container.format.name.split(',')[0]} file (streams: {found})", 422)
    stream = container.streams.video[0]
    w, h = stream.codec_context.width, stream.codec_context.height
    if w * h > limits.max_pixels:
        raise InputError(f"video frames too large: {w}x{h} pixels (limit {limits.max_pixels} pixels)", 413)
    return stream


def probe_video(source: VideoSource, limits: VideoLimits = VideoLimits()) -> VideoInfo:
    """Demux (without decoding) to get the frame timestamps, enforcing the limits."""
    with _open(source, limits) as container:
        stream = _video_stream(container, limits)
        tb = float(stream.time_base or 0) or 1.0 / 90000
        pts: list[int] = []
        last_dur, exact = 0, True
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                exact = exact and packet.pts is not None and not packet.is_discard
                t = packet.pts if packet.pts is not None else packet.dts
                pts.append(t if t is not None else (pts[-1] + max(last_dur, 1) if pts else 0))
                last_dur = packet.duration or last_dur
                if len(pts) > limits.max_frames:
                    raise InputError(f"video too long: more than {limits.max_frames} frames", 413)
                if (pts[-1] - pts[0]) * tb > limits.max_duration_s:
                    raise InputError(f"video too long: more than {limits.max_duration_s:g} s", 413)
        except _av().error.FFmpegError as e:
            if not pts:
                raise InputError(f"cannot decode video: corrupt data ({e})", 400) from e
            log.warning("video truncated after %d packets: %s", len(pts), e)
        if not pts:
            raise InputError("video has no frames (empty or truncated stream)", 422)
        pts.sort()
        times = [(p - pts[0]) * tb for p in pts]
        step = last_dur * tb if last_dur else (times[-1] / (len(times) - 1) if len(times) > 1 else 0.0)
        if not step and stream.average_rate:
            step = 1.0 / float(stream.average_rate)
        duration = times[-1] + step
        fps = len(times) / duration if duration > 0 else float(stream.average_rate or 0.0)
        return VideoInfo(
            format=container.format.name, codec=stream.codec_context.name,
            width=stream.codec_context.width, height=stream.codec_context.height,
            n_frames=len(times), timestamps=times, duration=duration, fps=fps,
            pts=pts if exact and len(set(pts)) == len(pts) else [],
        )


def decode_frames(source: VideoSource, indices: Iterable[int], limits: VideoLimits = VideoLimits(),
                  pts: Sequence[int] = ()) -> dict[int, Image.Image]:
    """Decode the stream up to the last wanted frame; return ``{index: RGB image}`` for the wanted ones.

    Frames are counted in presentation order (the order of :attr:`VideoInfo.timestamps`). If the
    data ends early (a truncated upload), missing indices get the nearest earlier decoded frame.
    Given the probe's ``pts`` (:attr:`VideoInfo.pts`), an H.264/HEVC stream is decoded by
    :func:`_decode_skipping` first.
    """
    wanted = sorted(set(int(i) for i in indices))
    if not wanted:
        return {}
    if pts:
        got = _decode_skipping(source, wanted, limits, pts)
        if got is not None:
            return got
    out: dict[int, Image.Image] = {}
    last: av.VideoFrame | None = None
    n = 0
    with _open(source, limits) as container:
        stream = _video_stream(container, limits)
        _prepare_decoder(stream, limits)
        want = set(wanted)
        try:
            for frame in container.decode(stream):
                _check_pixels(frame, limits)
                if n in want:
                    out[n] = to_rgb(frame)
                last, n = frame, n + 1
                if n > wanted[-1] or n >= limits.max_frames:
                    break
        except _av().error.FFmpegError as e:
            if n == 0:
                raise InputError(f"cannot decode video: corrupt data ({e})", 400) from e
            log.warning("video decoding stopped after %d frames: %s", n, e)
        missing = [i for i in wanted if i not in out]  # all past the end of a truncated stream
        if missing:
            if last is None:
                raise InputError("video has no decodable frames", 422)
            log.warning("video has %d frames, not %d: repeating the last one", n, wanted[-1] + 1)
            tail = out.get(n - 1) or to_rgb(last)
            out.update((i, tail) for i in missing)
    return out


SKIPPING_CODECS = ("h264", "hevc")
"""Codecs whose packets hold one frame each and whose decoders skip non-reference frames on request."""


def _decode_skipping(source: VideoSource, wanted: list[int], limits: VideoLimits, pts: Sequence[int]
                     ) -> dict[int, Image.Image] | None:
    """The ``wanted`` frames (sorted), each frame found by its pts (its index is the rank of its
    pts in the probe's ``pts``), with the decoder told to skip the non-reference frames nobody
    wants (``skip_frame``, set per packet; the other frames do not depend on them, so their
    pixels are unchanged): about a third less decoding for x264's B-frames. None, to decode
    every frame instead, for another codec, a frame whose pts is not a packet's or comes out of
    order, a missing frame or corrupt data."""
    rank = {p: i for i, p in enumerate(pts)}
    want, out, last = set(wanted), {}, -1
    with _open(source, limits) as container:
        stream = _video_stream(container, limits)
        ctx = stream.codec_context
        if ctx.name not in SKIPPING_CODECS:
            return None
        _prepare_decoder(stream, limits)
        try:
            for packet in container.demux(stream):
                i = rank.get(packet.pts) if packet.size else None
                ctx.skip_frame = "NONREF" if i is not None and i not in want else "DEFAULT"
                for frame in ctx.decode(packet):
                    _check_pixels(frame, limits)
                    j = rank.get(frame.pts, -1)
                    if j <= last:
                        return None
                    if j in want:
                        out[j] = to_rgb(frame)
                    last = j
                if len(out) == len(want):
                    return out
        except _av().error.FFmpegError:
            return None
    return None


def _check_pixels(frame: av.VideoFrame, limits: VideoLimits) -> None:
    if frame.width * frame.height > limits.max_pixels:
        raise InputError(f"video frames too large: {frame.width}x{frame.height} pixels "
                         f"(limit {limits.max_pixels} pixels)", 413)


def decode_video(source: VideoSource, indices: Sequence[int] | None = None,
                 limits: VideoLimits = VideoLimits()) -> DecodedVideo:
    """Probe, then decode ``indices`` (default: every frame, within ``limits.max_frames``)."""
    return read_clip(source, lambda info: range(info.n_frames) if indices is None else indices, limits)


def read_clip(source: VideoSource, plan: int | Callable[[VideoInfo], Sequence[int]],
              limits: VideoLimits = VideoLimits(), mode: str = "uniform",
              rng: random.Random | None = None) -> DecodedVideo:
    """THE clip reader (serving, training datasets and the SDK): probe within ``limits``, choose
    the frames, decode them in one pass. ``plan`` is a clip length (``sample_indices`` with
    ``mode`` and ``rng``) or a function from the probed :class:`VideoInfo` to frame indices.
    The frames come back in the order (and with the repeats) of the plan."""
    info = probe_video(source, limits)
    if isinstance(plan, int):
        idx = sample_indices(info.n_frames, plan, mode, rng)
    else:
        idx = [min(max(int(i), 0), info.n_frames - 1) for i in plan(info)]
    frames = decode_frames(source, idx, limits, info.pts)
    return DecodedVideo(info=info, indices=idx, frames=[frames[i] for i in idx],
                        timestamps=[info.timestamps[i] for i in idx])


def sample_at_rate(info: VideoInfo, fps: float, min_frames: int, max_frames: int) -> list[int]:
    """Frame indices spread uniformly over the video at about ``fps`` per second, at least
    ``min_frames`` (repeating frames in very short videos) and at most ``max_frames``."""
    want = int(round(info.duration * fps)) if fps > 0 else min_frames
    return sample_indices(info.n_frames, max(min_frames, min(want, max_frames)))


FRAME_MEMORY_BLOCKS = 32
"""Freed PIL image blocks a video worker keeps for its next frames (:func:`reuse_frame_memory`):
a 1080p RGB frame is one 8 MB block, so at most about 256 MB stay with the process."""


def reuse_frame_memory(blocks: int = FRAME_MEMORY_BLOCKS) -> None:
    """Let PIL (process-wide) keep up to ``blocks`` freed image blocks and reuse them, instead of
    returning each frame's memory to the system and faulting fresh pages in for the next: on this
    project's 2-core VM, decoding the 24 sampled frames of the 4 s 1080p clip in the video handler
    fell from 391-410 to 353-366 ms (medians of 5, alternated). Called by the handlers that decode
    frames, at start-up."""
    Image.core.set_blocks_max(max(blocks, Image.core.get_blocks_max()))


def to_rgb(frame: av.VideoFrame) -> Image.Image:
    """A decoded frame as an upright RGB image. The pixels of ``frame.to_image()`` (the same
    swscale conversion), without its row-by-row copies: 1 ms against 8 for a 1080p frame."""
    return upright(Image.fromarray(frame.to_ndarray(format="rgb24")), frame.rotation)


def upright(img: Image.Image, rotation: float) -> Image.Image:
    """Apply the display-matrix rotation (degrees counter-clockwise) phones store in MOV/MP4."""
    r = int(round(rotation or 0)) % 360
    if r == 90:
        return img.transpose(Image.Transpose.ROTATE_90)
    if r == 180:
        return img.transpose(Image.Transpose.ROTATE_180)
    if r == 270:
        return img.transpose(Image.Transpose.ROTATE_270)
    return img


def sample_indices(n_frames: int, clip_len: int, mode: str = "uniform",
                   rng: random.Random | None = None) -> list[int]:
    """``clip_len`` frame indices in temporal order, covering all ``n_frames``.

    The clip is cut into ``clip_len`` equal segments; ``uniform`` takes each segment's centre
    (evaluation, serving), ``random`` a random point in each (training). Clips shorter than
    ``clip_len`` repeat frames (each frame held for about ``clip_len / n_frames`` steps).
    """
    if n_frames <= 0:
        raise ValueError("no frames to sample from")
    if clip_len <= 0:
        raise ValueError("clip_len must be positive")
    if mode not in ("uniform", "random"):
        raise ValueError(f"unknown sampling mode {mode!r}")
    seg = n_frames / clip_len
    if mode == "uniform":
        pos = [(i + 0.5) * seg for i in range(clip_len)]
    else:
        r = rng or random
        pos = [(i + r.random()) * seg for i in range(clip_len)]
    return [min(int(p), n_frames - 1) for p in pos]


def windows(timestamps: Sequence[float], window_seconds: float, stride: float, clip_len: int = 16,
            duration: float | None = None) -> list[Window]:
    """Timeline windows of ``window_seconds`` every ``stride`` seconds, each with ``clip_len``
    uniformly sampled frame indices. The last window is aligned to the end of the video so the
    tail is covered; a video no longer than one window gives a single window.
    """
    if not timestamps:
        raise ValueError("no frames to sample from")
    if window_seconds <= 0 or stride <= 0:
        raise ValueError("window_seconds and stride must be positive")
    t0 = timestamps[0]
    if duration is None:
        step = (timestamps[-1] - t0) / (len(timestamps) - 1) if len(timestamps) > 1 else 0.0
        duration = timestamps[-1] - t0 + step
    if duration <= window_seconds:
        starts = [0.0]
    else:
        count = int(math.floor((duration - window_seconds) / stride + 1e-9)) + 1
        starts = [k * stride for k in range(count)]
        if starts[-1] + window_seconds < duration - 1e-6:
            starts.append(duration - window_seconds)
    rel = [t - t0 for t in timestamps]
    out = []
    for s in starts:
        e = min(s + window_seconds, duration)
        lo, hi = bisect.bisect_left(rel, s - 1e-9), bisect.bisect_left(rel, e - 1e-9)
        if hi <= lo:  # sparse timestamps (e.g. a slow GIF): the frame showing at ``s``
            lo = max(bisect.bisect_right(rel, s + 1e-9) - 1, 0)
            hi = lo + 1
        out.append(Window(start=s, end=e, indices=[lo + j for j in sample_indices(hi - lo, clip_len)]))
    return out
