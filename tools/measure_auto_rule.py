"""Which images should ``auto`` detection classify whole, and which get the aligned face?

Scores the image model (as served: ``training.evaluate``'s path) under each candidate rule of
``handlers.faces.is_tight_crop``, on two kinds of input a user sends:

* photos of people (``--photos``: a folder with labels.csv, e.g. ../shared/data/photos);
* tight face crops at a photo's resolution: FER2013 ``--val`` crops upscaled to ``--side`` px
  (bicubic), the way a user's own face crop arrives.

A rule is a coverage threshold: an image larger than TIGHT_MAX_SIDE whose largest face box
covers at least that fraction of it is classified whole; ``off`` is the shipped rule (every
detected face is aligned; handlers/faces.py records the figures that chose it).

    .venv/bin/python tools/measure_auto_rule.py --weights pretrain/emotion_image.pth
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from handlers import faces  # noqa: E402
from handlers.preprocess import to_uint8  # noqa: E402
from model_defs import load_model  # noqa: E402
from training.datasets import ImageFolderDataset, detected_face_crop, image_dataset  # noqa: E402
from training.engine import evaluate_model  # noqa: E402


class Upscaled(ImageFolderDataset):
    """FER2013 crops as a user's tight crop at ``side`` px."""

    def __init__(self, root: Path, spec: dict, side: int, face_crop, limit: int) -> None:
        super().__init__(root, spec, face_crop)
        step = max(1, len(self.files) // limit) if limit else 1
        self.files, self.labels = self.files[::step], self.labels[::step]
        self.side = side

    def __getitem__(self, i: int):
        img = Image.open(self.files[i]).convert("RGB").resize((self.side, self.side), Image.BICUBIC)
        return to_uint8(self.face_crop(img), self.spec), self.labels[i]


def covering(threshold: float, shipped):
    """The shipped rule, plus: whole when the largest face box covers >= ``threshold`` of the image."""
    def rule(img: Image.Image, found) -> bool:
        if shipped(img, found):
            return True
        x1, y1, x2, y2 = max(found, key=lambda f: f.size).box
        return (x2 - x1) * (y2 - y1) >= threshold * img.width * img.height
    return rule


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default="pretrain/emotion_image.pth")
    p.add_argument("--photos", default="../shared/data/photos")
    p.add_argument("--val", default="../shared/data/fer2013/val")
    p.add_argument("--side", type=int, default=192)
    p.add_argument("--limit", type=int, default=700, help="FER crops to score (0 = all)")
    p.add_argument("--coverages", default="0.4,0.6,off")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.weights)
    spec = model.spec.to_dict()
    crop = detected_face_crop(spec, "cpu", "auto")
    out = {}
    shipped = faces.is_tight_crop
    for cov in args.coverages.split(","):
        faces.is_tight_crop = shipped if cov == "off" else covering(float(cov), shipped)
        photos = evaluate_model(model, DataLoader(image_dataset(args.photos, spec, crop), batch_size=64))
        tight = evaluate_model(model, DataLoader(Upscaled(Path(args.val), spec, args.side, crop, args.limit), batch_size=64))
        out[cov] = {"photos_acc": photos["acc"], "photos_top3": photos["acc_top3"], "photos_n": photos["n"],
                    f"fer_val_{args.side}px_acc": tight["acc"], "fer_val_n": tight["n"]}
        print(f"coverage {cov}: photos acc {photos['acc']:.3f} top3 {photos['acc_top3']:.3f} (n {photos['n']}) | "
              f"FER val at {args.side}px acc {tight['acc']:.3f} (n {tight['n']})", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
