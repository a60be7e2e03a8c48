"""Annotated pictures and videos from the command line, without a server::

    python -m demo.annotate photo.jpg -o photo_annotated.png
    python -m demo.annotate photo.jpg -o photo_why.png --explain   # + each face's map
    python -m demo.annotate clip.mp4 -o clip_annotated.mp4      # + clip_annotated_timeline.png

A photo becomes a PNG with a numbered box and the top label on each face, and the top-3 bars
beside it. A video becomes an H.264 MP4 with each tracked person's box and current label drawn
on every frame, and a PNG plot of the main person's seven probabilities over the timeline
windows. Inference runs in this process (``demo.inprocess``: the handlers' steps on the
``pretrain/`` checkpoints).
"""
from __future__ import annotations

import argparse
import logging
import sys
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
from PIL import Image
from tqdm import tqdm

from handlers.contract import DETECTION_MODES, FACE_DETECTORS, IMAGE_DEFAULTS
from handlers.preprocess import InputError, decode_image
from handlers.video_decode import upright
from model_defs import SHIPPED_WEIGHTS

from . import draw
from .inprocess import Recognizer, VideoResult, top
from .palette import color_of
from .plot import timeline_png

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".3gp", ".mkv", ".webm", ".avi", ".gif"}


def is_video(path: Path) -> bool:
    """A video by its name (an animated GIF counts; a still GIF is a photo)."""
    suffix = path.suffix.lower()
    if suffix == ".gif":
        with Image.open(path) as img:
            return getattr(img, "n_frames", 1) > 1
    return suffix in VIDEO_SUFFIXES


def annotate_photo(rec: Recognizer, src: Path, out: Path, explain: bool = False) -> int:
    """Write the annotated photo (with ``explain``, each face's map over it and beside its bars,
    as ``POST /explanations`` answers); returns the number of faces drawn."""
    img = decode_image(src.read_bytes())
    faces = rec.image(img, explain=explain)
    labels = rec.labels
    why = [(f.explanation.map, f.explanation.corners, f.explanation.crop) if f.explanation else None
           for f in faces]
    picture = draw.annotate_photo(img, [f.box for f in faces], [top(f.probs, labels) for f in faces],
                                  [f.detected for f in faces], why)
    picture.save(out, format="PNG")
    return len(faces)


def timeline_path(out: Path) -> Path:
    """``clip_annotated.mp4`` -> ``clip_annotated_timeline.png``."""
    return out.with_name(f"{out.stem}_timeline.png")


def _frames(src: Path):
    """Every frame, upright, in presentation order (the indices ``handlers.video_decode`` uses)."""
    with av.open(str(src)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            yield upright(frame.to_image(), frame.rotation)


def draw_frame(img: Image.Image, n: int, t: float, result: VideoResult, labels: Sequence[str]) -> None:
    """Each person present at frame ``n`` (time ``t``): box and current label, the labels kept off
    one another and off the other faces; no face: a banner."""
    faces = [person.face_at(n) if person.faces else None for person in result.people]
    taken: list[draw.Rect] = []
    for k, (person, face) in enumerate(zip(result.people, faces)):  # numbered from 1, the main person first
        probs = top(person.probs_at(t), labels)
        if not person.faces:
            draw.draw_banner(img, draw.label_text(probs, "whole frame: "), color_of(probs[0][0]))
        elif face is not None:
            others = [f.box for j, f in enumerate(faces) if f is not None and j != k]
            draw.draw_box(img, face.box, draw.label_text(probs, f"#{k + 1} "), color_of(probs[0][0]), taken, others)


def annotate_video(rec: Recognizer, src: Path, out: Path, plot: Path, progress: bool | None = None) -> VideoResult:
    """Write the annotated MP4 and the timeline plot; returns what was found."""
    log.info("analysing %s (sampling, face tracking, the video model)…", src)
    result = rec.video(src)
    info, labels = result.info, rec.labels

    rate = Fraction(info.fps).limit_denominator(1001) if info.fps > 0 else Fraction(25)
    t0 = info.timestamps[0] if info.timestamps else 0.0
    with av.open(str(out), "w", format="mp4") as container:
        stream = None
        # progress None: a bar on a terminal only (tqdm's disable=None)
        frames = tqdm(_frames(src), total=info.n_frames, unit="frame", desc="annotating",
                      disable=None if progress is None else not progress)
        for n, img in enumerate(frames):
            img = img.convert("RGB")
            if stream is None:
                stream = container.add_stream("libx264", rate=rate)
                stream.width, stream.height = img.width - img.width % 2, img.height - img.height % 2
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": "20"}
            t = (info.timestamps[n] - t0) if n < len(info.timestamps) else n / float(rate)
            draw_frame(img, n, t, result, labels)
            if img.size != (stream.width, stream.height):
                img = img.crop((0, 0, stream.width, stream.height))
            frame = av.VideoFrame.from_image(img)
            frame.pts = n
            frame.time_base = 1 / rate
            container.mux(stream.encode(frame))
        if stream is None:
            raise ValueError(f"{src}: no frames decoded")
        container.mux(stream.encode())
    main = result.main
    windows = main.windows or [(0.0, info.duration)]
    probs = main.timeline or [main.overall]
    who = "main person" if main.faces else "whole frames (no face found)"
    timeline_png(plot, windows, probs, labels, info.duration,
                 f"{src.name}: {who}, {len(main.windows) or 'one'} window{'s' if len(main.windows) != 1 else ''}")
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m demo.annotate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path, help="a photo (JPEG, PNG, ...) or a video (MP4, MOV, WebM, AVI, GIF)")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="the annotated file: .png for a photo, .mp4 for a video")
    p.add_argument("--timeline", type=Path, help="the video's timeline plot (default: OUTPUT_timeline.png)")
    p.add_argument("--image-weights", type=Path, default=SHIPPED_WEIGHTS["image"], help="default: %(default)s")
    p.add_argument("--video-weights", type=Path, default=SHIPPED_WEIGHTS["video"], help="default: %(default)s")
    p.add_argument("--detection", choices=DETECTION_MODES, default="auto",
                   help="face detection, as the service's option (default: %(default)s)")
    p.add_argument("--detector", choices=FACE_DETECTORS, default=IMAGE_DEFAULTS["detector"],
                   help="the face detector, as the service's option (default: %(default)s)")
    p.add_argument("--explain", action="store_true",
                   help="a photo: draw each face's map (what the model looked at for its top label)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    src, out = args.input, args.output
    if not src.is_file():
        log.error("no such file: %s", src)
        return 2
    try:
        video = is_video(src)
    except OSError as e:
        log.error("cannot read %s: %s", src, e)
        return 2
    want = ".mp4" if video else ".png"
    if out.suffix.lower() != want:
        log.error("-o %s: a %s is written as %s", out, "video" if video else "photo", want)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    rec = Recognizer(None if video else args.image_weights, args.video_weights if video else None, args.detection,
                     detector=args.detector)
    try:
        if video:
            plot = args.timeline or timeline_path(out)
            result = annotate_video(rec, src, out, plot, progress=False if args.no_progress else None)
            log.info("wrote %s (%d people tracked) and %s", out, sum(1 for p in result.people if p.faces), plot)
        else:
            n = annotate_photo(rec, src, out, explain=args.explain)
            log.info("wrote %s (%d face%s)", out, n, "" if n == 1 else "s")
    except (InputError, FileNotFoundError, ValueError) as e:
        log.error("%s: %s", src, e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
