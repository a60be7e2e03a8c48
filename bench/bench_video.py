"""End-to-end CPU time of the video handler per 4-second clip, by stage, in-process (no server).

Stages: decode (probe + decode the sampled frames), detect (the face detector, ``--detectors``, on keyframes, tracking, and
alignment of every tracked face on every sampled frame), infer (one forward pass over every
crop, or every clip of a clip model: the model's own share, with pooling and the answer), and
stack (model inputs). ``--keyframe-every 0,1`` compares the served keyframe interval (0) with
detection on every sampled frame (1). Clips: a MEAD clip (256x256, one face) and the
1080p multi-face clip from ``../shared/data/videos/unlabelled``, each cut to 4 s. Uses
``pretrain/emotion_video.pth`` if present, else random weights (speed does not depend on them).
Prints a markdown table and, last, one JSON line. Reports min and median over repeats (the
machine is shared: the minimum is the stage's own cost), the process's CPU time per request
(less sensitive than wall time to other jobs on the machine) and the load average.

    .venv/bin/python -m bench.bench_video --reps 3 [--detectors mtcnn,retinaface]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import zipfile
from fractions import Fraction
from pathlib import Path

import av
import torch
import yaml

from export.__main__ import main as export_main
from handlers.contract import VIDEO_DEFAULTS
from handlers.video_handler import EmotionVideoHandler
from handlers.video_batch import VideoBatch
from model_defs import create_model, save_weights
from training.video_from_image import build

REPO = Path(__file__).resolve().parent.parent

DATA = REPO.parent / "shared" / "data" / "videos"
SHIPPED = REPO / "pretrain" / "emotion_video.pth"


def cut(path: Path, seconds: float) -> bytes:
    """The first ``seconds`` of a video re-encoded as H.264 MP4 at its own size and rate."""
    buf = io.BytesIO()
    with av.open(str(path)) as src, av.open(buf, "w", format="mp4") as out:
        vs = src.streams.video[0]
        rate = vs.average_rate or Fraction(25)
        dst = out.add_stream("libx264", rate=rate)
        dst.width, dst.height, dst.pix_fmt = vs.codec_context.width, vs.codec_context.height, "yuv420p"
        n = int(round(seconds * float(rate)))
        for i, frame in enumerate(src.decode(vs)):
            if i >= n:
                break
            for p in dst.encode(av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24")):
                out.mux(p)
        for p in dst.encode():
            out.mux(p)
    return buf.getvalue()


class _Ctx:
    """Just what ``EmotionVideoHandler.initialize`` reads from a TorchServe context."""

    def __init__(self, model_dir: Path, options: dict) -> None:
        self.manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        cfg = yaml.safe_load((model_dir / "model-config.yaml").read_text())
        cfg["handler"] = {**cfg["handler"], **options}
        self.model_yaml_config = cfg


def build_handler(tmp: Path, options: dict, weights: Path = SHIPPED) -> EmotionVideoHandler:
    ckpt = weights
    if not ckpt.is_file():
        torch.manual_seed(0)
        save_weights(create_model("emo_resnet_s"), tmp / "image.pth")
        ckpt = build(tmp / "image.pth", tmp / "random.pth")
    if not (tmp / "model").is_dir():
        assert export_main(["--task", "video", "--checkpoint", str(ckpt), "--out", str(tmp)]) == 0
        with zipfile.ZipFile(tmp / "emotion_video.mar") as z:
            z.extractall(tmp / "model")
    h = EmotionVideoHandler()
    h.initialize(_Ctx(tmp / "model", options))
    return h


def run_once(h: EmotionVideoHandler, data: bytes) -> dict[str, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    batch = VideoBatch(1)
    batch.requests.append(h.decode_request(0, data))
    t1 = time.perf_counter()
    h.crop_faces(batch)
    t2 = time.perf_counter()
    batch.clips = h.pipeline.inputs(batch.requests)
    t3 = time.perf_counter()
    out = h.postprocess(h.inference(batch))
    t4, c4 = time.perf_counter(), time.process_time()
    assert isinstance(out[0], dict) and "top3" in out[0], out
    req = batch.requests[0]
    return {"decode": t1 - t0, "detect": t2 - t1, "stack": t3 - t2, "infer": t4 - t3, "total": t4 - t0,
            "cpu": c4 - c0,
            "clips": len(req.clips), "frames": len(req.sampled), "found": req.found, "people": len(out[0].get("people", [])),
            "detected": out[0]["faces"]["detected_frames"], "crops": int(batch.clips.shape[0]),
            "top1": out[0]["top3"][0]["label"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--modes", default="auto,never", help="detection modes to time")
    p.add_argument("--detect-max-side", type=int, help="override the archive's detect_max_side")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the handler (0: the archive's: cores / workers)")
    p.add_argument("--weights", type=Path, default=SHIPPED, help="video checkpoint (default: the shipped one)")
    p.add_argument("--detectors", default=VIDEO_DEFAULTS["detector"], help="comma-separated face detectors to time")
    p.add_argument("--keyframe-every", default="0",
                   help="comma-separated keyframe intervals to time (0: the archive's; 1: detect on every sampled frame)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    labelled = DATA / "labelled"
    multi = DATA / "unlabelled" / "facenet_pytorch_video.mp4"
    if not (labelled / "labels.csv").is_file() or not multi.is_file():
        print(f"skipped: shared video data not found under {DATA}")
        return 0
    with open(labelled / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    mead = max(rows, key=lambda r: int(r["frames"]))["file"]  # the longest, to cut 4 s from
    clips = {f"MEAD {mead} (256x256)": cut(labelled / mead, args.seconds),
             "facenet_pytorch_video.mp4 (1920x1080, several faces)": cut(multi, args.seconds)}
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-video-") as tmp:
        for mode, every, detector in [(m, int(k), d) for m in args.modes.split(",") for k in args.keyframe_every.split(",")
                                      for d in args.detectors.split(",")]:
            if mode == "never" and (every or detector != args.detectors.split(",")[0]):
                continue
            opts = {"detection": mode, "detector": detector, **({"threads": args.threads} if args.threads else {})}
            if args.detect_max_side:
                opts["detect_max_side"] = args.detect_max_side
            if every:
                opts["keyframe_every"] = every
            h = build_handler(Path(tmp), opts, args.weights)
            for name, data in clips.items():
                runs = [run_once(h, data) for _ in range(args.reps + 1)][1:]  # the first warms up
                row = {"clip": name, "detection": mode if mode == "never" else f"{mode} ({detector})",
                       "keyframe_every": h.pipeline.keyframe_every,
                       "threads": torch.get_num_threads(), "optimized": h.optimized,
                       **{k: runs[0][k] for k in ("clips", "frames", "found", "people", "detected", "crops", "top1")}}
                for k in ("decode", "detect", "stack", "infer", "total", "cpu"):
                    vals = [r[k] * 1000 for r in runs]
                    row[f"{k}_ms_min"] = round(min(vals), 1)
                    row[f"{k}_ms_median"] = round(statistics.median(vals), 1)
                row["model_share"] = round(row["infer_ms_min"] / row["total_ms_min"], 3)
                results.append(row)
    print(f"| clip ({args.seconds:g} s) | detection | keyframe every | frames (detected) | people | crops | decode | detect+track+align | infer (model) | total | process CPU | model share |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['clip']} | {r['detection']} | {r['keyframe_every']} | {r['frames']} ({r['detected']}) | {r['people']} | {r['crops']} | "
              + " | ".join(f"{r[k + '_ms_min']:.0f} ({r[k + '_ms_median']:.0f})" for k in ("decode", "detect", "infer", "total", "cpu"))
              + f" | {r['model_share']:.0%} |")
    print("times in ms: min (median) over", args.reps, f"runs; process CPU: both threads' CPU time; "
          f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(json.dumps({"bench": "video_handler", "seconds": args.seconds, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
