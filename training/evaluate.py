"""Evaluate a model on a labelled folder; the last line printed is one JSON object.

    python -m training.evaluate --task image --data ../shared/data/fer2013/val
    python -m training.evaluate --task image --data ../shared/data/photos --detect-faces
    python -m training.evaluate --task video --data ../shared/data/videos/labelled --pooling mean,window
    python -m training.evaluate --set fer2013=../shared/data/fer2013/val --set affectnet=../shared/data/affectnet/val \
        --set photos=../shared/data/photos,detect=auto        # one table, a row per set

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

from handlers.contract import DETECTION_MODES, FACE_DETECTORS, IMAGE_DEFAULTS, VIDEO_DEFAULTS
from model_defs import SHIPPED_WEIGHTS, load_model

from .datasets import detected_face_crop, image_dataset
from .engine import evaluate_model
from .ferplus import read_votes, with_ferplus_majority
from .metrics import confusion_figure
from .sources import one_of, parse_named
from .video_eval import evaluate_videos, markdown as video_markdown

log = logging.getLogger("training.evaluate")



def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate an emotion model", add_help=add_help)
    p.add_argument("--task", choices=["image", "video"], default="image")
    p.add_argument("--data", help="ImageFolder tree, or folder with labels.csv")
    p.add_argument("--set", action="append", metavar="NAME=PATH[,detect=auto|always][,ferplus=CSV]",
                   help="--task image: score several labelled folders in one run and print a table per set "
                        "(repeat; e.g. fer2013=../shared/data/fer2013/val photos=../shared/data/photos,detect=auto)")
    p.add_argument("--weights", help="weights file (default: the shipped pretrain/emotion_<task>.pth)")
    p.add_argument("--detect-faces", action="store_true", help="detect and align faces first (whole photos)")
    p.add_argument("--detection", choices=[m for m in DETECTION_MODES if m != "never"], default="auto",
                   help="with --detect-faces: auto (the handler's default: tight crops are classified "
                        "whole) or always (largest face of every photo that has one)")
    p.add_argument("--detector", choices=FACE_DETECTORS, default=IMAGE_DEFAULTS["detector"],
                   help="with --detect-faces or detect=: the face detector (default: the served one, %(default)s)")
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
        if not args.data:
            raise SystemExit("--task video needs --data (a folder of labelled videos)")
        out = evaluate_videos(args, weights)
        out.update(weights=str(weights), data=str(args.data))
        print(video_markdown(out))
        print(json.dumps(out))
        return out
    model = load_model(weights, map_location=args.device)
    spec = model.spec.to_dict()
    if args.set:
        return _evaluate_sets(args, model, weights)
    if not args.data:
        raise SystemExit("give --data (one labelled folder) or --set (several)")
    out = score_images(model, args.data, args.device, args.detection if args.detect_faces else "never",
                       args.ferplus, args.batch_size, args.workers, detector=args.detector)
    out.update(weights=str(weights), data=str(args.data), detect_faces=args.detect_faces)
    if args.confusion_png:
        title = f"{spec['arch']} on {args.data} (acc {out['acc']:.3f})"
        confusion_figure(out["confusion"], spec["labels"], title).savefig(args.confusion_png, dpi=100)
    print(json.dumps(out))
    return out


def score_images(model: torch.nn.Module, data: str | Path, device: str, detection: str = "never",
                 ferplus: str | Path | None = None, batch_size: int = 128, workers: int = 2,
                 detector: str = str(IMAGE_DEFAULTS["detector"])) -> dict:
    """A labelled folder scored as served (the handler's preprocessing, and with ``detection``
    ``auto``/``always`` its detection and alignment; the spec's mirror averaging and temperature):
    acc, acc_top3, n, ece, per_class, confusion, and how it was scored."""
    spec = model.spec.to_dict()
    face_crop = detected_face_crop(spec, device, detection, detector_name=detector) if detection != "never" else None
    ds = image_dataset(data, spec, face_crop)
    if ferplus:
        ds = with_ferplus_majority(ds, read_votes(ferplus))
    loader = DataLoader(ds, batch_size=batch_size, num_workers=0 if face_crop else workers)
    res = evaluate_model(model, loader, device)
    out = {k: res[k] for k in ("acc", "acc_top3", "n", "ece", "per_class", "confusion")}
    out.update(detection=detection, labels="ferplus_majority" if ferplus else "dataset",
               detector=detector if detection != "never" else None)
    return out


SET_OPTIONS = {"detect": lambda v: one_of(v, [m for m in DETECTION_MODES if m != "never"]), "ferplus": Path}
"""``--set`` options: ``detect=auto|always`` (detection and alignment first), ``ferplus=CSV`` (crowd majority labels)."""


def _evaluate_sets(args: argparse.Namespace, model: torch.nn.Module, weights: Path) -> dict:
    """Every ``--set`` with the same weights: a markdown table, then one JSON line."""
    try:
        sets = [parse_named(t, SET_OPTIONS) for t in args.set]
    except ValueError as e:
        raise SystemExit(f"--set {e}") from e
    results = {name: score_images(model, path, args.device, opts.get("detect", "never"), opts.get("ferplus"),
                                  args.batch_size, args.workers, detector=args.detector) | {"data": str(path)}
               for name, path, opts in sets}
    print(sets_markdown(results, model.spec.labels))
    out = {"weights": str(weights), "sets": results}
    print(json.dumps(out))
    return out


def sets_markdown(results: dict[str, dict], labels: list[str]) -> str:
    """Per set: n, top-1, top-3, ECE and each class's recall, as a markdown table."""
    head = ["set", "n", "top-1", "top-3", "ECE", *labels]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        recall = ["–" if r["per_class"][c] is None else f"{r['per_class'][c]:.3f}" for c in labels]
        rows.append(f"| {name} | {r['n']} | {r['acc']:.4f} | {r['acc_top3']:.4f} | {r['ece']:.3f} | "
                    + " | ".join(recall) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
