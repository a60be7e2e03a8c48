"""Evaluate a model on a labelled folder; the last line printed is one JSON object.

    python -m training.evaluate --task image --data ../shared/data/fer2013/val
    python -m training.evaluate --task image --data ../shared/data/photos --detect-faces

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

from model_defs import load_model

from .engine import evaluate

log = logging.getLogger("training.evaluate")

REPO = Path(__file__).resolve().parent.parent
SHIPPED = {"image": REPO / "pretrain" / "emotion_image.pth", "video": REPO / "pretrain" / "emotion_video.pth"}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate an emotion model", add_help=add_help)
    p.add_argument("--task", choices=["image", "video"], default="image")
    p.add_argument("--data", required=True, help="ImageFolder tree, or folder with labels.csv")
    p.add_argument("--weights", help="weights file (default: the shipped pretrain/emotion_<task>.pth)")
    p.add_argument("--detect-faces", action="store_true", help="detect and align faces first (whole photos)")
    p.add_argument("-b", "--batch-size", type=int, default=128)
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def build_face_crop(spec: dict, device: str):
    """The handler's detect-and-align step as a PIL → PIL function (largest face, else whole image)."""
    from handlers.faces import FaceDetector, faces_for_images

    detector = FaceDetector(device=device)

    def crop(img):
        return faces_for_images([img], detector, "auto", spec)[0][0][1]

    return crop


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = Path(args.weights) if args.weights else SHIPPED[args.task]
    model = load_model(weights, map_location=args.device)
    spec = model.spec.to_dict()
    if args.task == "video":
        from .video_data import video_eval_dataset
        ds = video_eval_dataset(args.data, spec, detect_faces=args.detect_faces, device=args.device)
    else:
        from .datasets import image_dataset
        face_crop = build_face_crop(spec, args.device) if args.detect_faces else None
        ds = image_dataset(args.data, spec, face_crop)
    workers = 0 if args.detect_faces else args.workers
    loader = DataLoader(ds, batch_size=args.batch_size, num_workers=workers)
    res = evaluate(model, loader, args.device, tta_flip=bool(spec.get("extra", {}).get("tta_flip")))
    out = {k: res[k] for k in ("acc", "acc_top3", "n", "per_class", "confusion")}
    out.update(weights=str(weights), data=str(args.data), detect_faces=args.detect_faces)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
