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
    p.add_argument("--detection", choices=["auto", "always"], default="auto",
                   help="with --detect-faces: auto (the handler's default: tight crops are classified "
                        "whole) or always (largest face of every photo that has one)")
    p.add_argument("-b", "--batch-size", type=int, default=128)
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--confusion-png", help="also save the confusion matrix as a PNG figure here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def build_face_crop(spec: dict, device: str, mode: str = "auto", min_face_size: int = 20):
    """The handler's detect-and-align step as a PIL → PIL function: the largest face.

    Calls ``handlers.faces.faces_for_images`` exactly as the image handler does (same mode,
    size, margin, channels and detector settings as the archive's defaults), and keeps the
    first entry, which is the largest face. In mode ``auto`` a tight face crop or a photo
    without a face is classified whole, as the handler does; in ``always`` a photo without a
    face is classified whole too (an evaluation must score every image).
    """
    from handlers.faces import DEFAULT_MARGIN, FaceDetector, faces_for_images

    detector = FaceDetector(device=device, min_face_size=min_face_size) if mode != "never" else None
    args = (int(spec["input_size"]), float(spec.get("face_margin") or 0.0) or DEFAULT_MARGIN,
            int(spec["channels"]))

    def crop(img):
        (crops,) = faces_for_images([img], detector, mode, *args)
        if not crops:  # mode "always", no face found
            (crops,) = faces_for_images([img], None, "never", *args)
        return crops[0].image

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
        face_crop = build_face_crop(spec, args.device, args.detection) if args.detect_faces else None
        ds = image_dataset(args.data, spec, face_crop)
    workers = 0 if args.detect_faces else args.workers
    loader = DataLoader(ds, batch_size=args.batch_size, num_workers=workers)
    res = evaluate(model, loader, args.device, tta_flip=bool(spec.get("extra", {}).get("tta_flip")))
    out = {k: res[k] for k in ("acc", "acc_top3", "n", "per_class", "confusion")}
    out.update(weights=str(weights), data=str(args.data), detect_faces=args.detect_faces,
               detection=args.detection if args.detect_faces else "never")
    if args.confusion_png:
        from .engine import confusion_figure
        confusion_figure(out["confusion"], f"{spec['arch']} on {args.data} (acc {out['acc']:.3f})").savefig(
            args.confusion_png, dpi=100)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
