"""Build the video checkpoint (and, with ``--archive``, its ``.mar``) from an image checkpoint.

    python -m training.video_from_image --image pretrain/emotion_image.pth \\
        --out pretrain/emotion_video.pth --archive model_store

The video model is the image network itself, run on each sampled frame's aligned face; the
clip's answer is pooled from the frames (``handlers/video_pool.py``). Everything the frame
network needs comes from the image checkpoint's spec: arch, input size, channels, mean/std, face
margin and its calibration extras (temperature, mirror averaging). The video options (pooling,
frames sampled per second) are stored in the video spec, so serving, ``training.evaluate`` and the
SDK read them from one place. Rerun this whenever the image weights change.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from export.__main__ import main as export_main
from handlers.video_pool import DEFAULT_PARAMS, POOLINGS, check_pooling
from model_defs import ModelSpec, create_model, load_checkpoint, save_weights
from model_defs.video_nets import video_spec_from_image

log = logging.getLogger("training.video_from_image")

DEFAULT_POOLING = "mean"  # what won on the labelled clips: pretrain/MODEL_CARD.md, "emotion_video.pth"
DEFAULT_SAMPLE_FPS = 6.0
DEFAULT_MAX_SAMPLED = 64


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", type=Path, required=True, help="image checkpoint (model_defs format)")
    p.add_argument("--out", type=Path, required=True, help="video checkpoint to write")
    p.add_argument("--pooling", choices=POOLINGS, default=DEFAULT_POOLING)
    p.add_argument("--pooling-params", default="{}",
                   help=f"JSON, e.g. '{{\"window\": 0.4}}' (defaults {json.dumps(DEFAULT_PARAMS)})")
    p.add_argument("--sample-fps", type=float, default=DEFAULT_SAMPLE_FPS,
                   help="frames sampled per second of video (at least --clip-len per video)")
    p.add_argument("--clip-len", type=int, default=16, help="fewest frames sampled from any video")
    p.add_argument("--max-sampled", type=int, default=DEFAULT_MAX_SAMPLED, help="most frames sampled from any video")
    p.add_argument("--archive", type=Path, help="also export emotion_video.mar into this folder")
    return p


def build(image: Path, out: Path, pooling: str = DEFAULT_POOLING, pooling_params: dict | None = None,
          sample_fps: float = DEFAULT_SAMPLE_FPS, clip_len: int = 16, max_sampled: int = DEFAULT_MAX_SAMPLED) -> Path:
    """Write the per-frame video checkpoint for image checkpoint ``image`` to ``out``."""
    check_pooling(pooling)
    ckpt = load_checkpoint(image)
    image_spec = ModelSpec.from_dict(ckpt["spec"])
    if image_spec.task != "image":
        raise ValueError(f"{image}: a {image_spec.task!r} checkpoint, not an image one")
    spec = video_spec_from_image(image_spec, clip_len=clip_len, pooling=pooling,
                                 pooling_params={**DEFAULT_PARAMS, **(pooling_params or {})},
                                 sample_fps=float(sample_fps), max_sampled=int(max_sampled))
    model = create_model(spec.arch, spec)
    model.load_state_dict(ckpt["state_dict"])
    save_weights(model, out, source={"image_checkpoint": str(image)})
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    a = get_args_parser().parse_args(argv)
    out = build(a.image, a.out, a.pooling, json.loads(a.pooling_params), a.sample_fps, a.clip_len, a.max_sampled)
    log.info("wrote %s from %s (pooling %s)", out, a.image, a.pooling)
    if a.archive:
        return export_main(["--task", "video", "--checkpoint", str(out), "--out", str(a.archive)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
