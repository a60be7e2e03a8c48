"""Evaluate a model on a labelled folder; the last line printed is one JSON object.

    python -m training.evaluate --task image --data ../shared/data/fer2013/val
    python -m training.evaluate --task image --data ../shared/data/photos --detect-faces
    python -m training.evaluate --task video --data ../shared/data/videos/labelled --pooling mean,window

``--data`` is an ImageFolder tree (``<class>/<image>``, missing classes allowed) or a folder
with a ``labels.csv``. Preprocessing is the handler's own (``handlers.preprocess``), and with
``--detect-faces`` the handler's detection and alignment, scoring each image by its largest face.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from handlers.contract import DETECTION_MODES, VIDEO_DEFAULTS
from model_defs import SHIPPED_WEIGHTS, load_model

from .datasets import detected_face_crop, image_dataset
from .engine import evaluate_model
from .ferplus import read_votes, with_ferplus_majority
from .metrics import confusion_figure
from .video_eval import evaluate_videos, markdown as video_markdown

log = logging.getLogger("training.evaluate")



def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate an emotion model", add_help=add_help)
    p.add_argument("--task", choices=["image", "video"], default="image")
    p.add_argument("--data", required=True, help="ImageFolder tree, or folder with labels.csv")
    p.add_argument("--weights", help="weights file (default: the shipped pretrain/emotion_<task>.pth)")
    p.add_argument("--detect-faces", action="store_true", help="detect and align faces first (whole photos)")
    p.add_argument("--detection", choices=[m for m in DETECTION_MODES if m != "never"], default="auto",
                   help="with --detect-faces: auto (the handler's default: tight crops are classified "
                        "whole) or always (largest face of every photo that has one)")
    p.add_argument("--ferplus", metavar="CSV",
                   help="score against the FER+ crowd majority from this ferplus_votes.csv instead of the folder "
                        "labels (ties and contempt/unknown/not-a-face majorities dropped)")
    p.add_argument("--pooling", help="--task video: comma-separated poolings to compare on the same frames "
                   "(mean = the per-frame baseline, confidence, window, peak; model = a clip model's own); "
                   "default: the checkpoint's")
    p.add_argument("--video-detection", choices=DETECTION_MODES, default=VIDEO_DEFAULTS["detection"],
                   help="--task video: face detection as the handler does it (default: the served one, %(default)s)")
    p.add_argument("--keyframe-every", type=int, default=0,
                   help="--task video: detect on every k-th sampled frame (1 = every frame; 0 = the served default)")
    p.add_argument("--labels-from-names", action="store_true",
                   help="--task video: take each video's emotion from its file name (furious = angry, happy, ...)")
    p.add_argument("-b", "--batch-size", type=int, default=128)
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--confusion-png", help="also save the confusion matrix as a PNG figure here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = Path(args.weights) if args.weights else SHIPPED_WEIGHTS[args.task]
    if args.task == "video":  # the serving pipeline, per pooling (training/video_eval.py)
        out = evaluate_videos(args, weights)
        out.update(weights=str(weights), data=str(args.data))
        print(video_markdown(out))
        print(json.dumps(out))
        return out
    model = load_model(weights, map_location=args.device)
    spec = model.spec.to_dict()
    face_crop = detected_face_crop(spec, args.device, args.detection) if args.detect_faces else None
    ds = image_dataset(args.data, spec, face_crop)
    if args.ferplus:
        ds = with_ferplus_majority(ds, read_votes(args.ferplus))
    workers = 0 if args.detect_faces else args.workers
    loader = DataLoader(ds, batch_size=args.batch_size, num_workers=workers)
    res = evaluate_model(model, loader, args.device)  # as served: the spec's mirror averaging and temperature
    out = {k: res[k] for k in ("acc", "acc_top3", "n", "ece", "per_class", "confusion")}
    out.update(weights=str(weights), data=str(args.data), detect_faces=args.detect_faces,
               detection=args.detection if args.detect_faces else "never",
               labels="ferplus_majority" if args.ferplus else "dataset")
    if args.confusion_png:
        title = f"{spec['arch']} on {args.data} (acc {out['acc']:.3f})"
        confusion_figure(out["confusion"], spec["labels"], title).savefig(args.confusion_png, dpi=100)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
