"""Measure the template that makes a detector's aligned crops match MTCNN's on real faces.

MTCNN's template (``faces.FACE_TEMPLATE``) was measured on FER2013 crops and its photo framing
checked on real photos (``tools/measure_photo_framing.py``). Another detector's landmarks sit
differently on the same face (RetinaFace's mouth corners higher, for instance), and by how much
depends on the image: on 48 px FER2013 crops upscaled to 160 px they sit otherwise than on sharp
colour faces. This tool runs both detectors on real colour faces (``--data``: an ImageFolder of
training faces, e.g. AffectNet ``train``; never a val split), keeps faces both find confidently,
maps ``--detector``'s landmarks into the frame where MTCNN's land on its template, and prints
their mean (made left-right symmetric): aligned to it, the detector's crops frame each face as
MTCNN's do. It also prints how far one face's crops differ between the detectors (scale and
centre) with the template in ``handlers/faces.py`` and with the measured one.

    .venv/bin/python tools/measure_detector_match.py --data ../shared/data/affectnet/train --limit 1500
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from handlers import faces as F  # noqa: E402
from handlers.contract import IMAGE_DEFAULTS  # noqa: E402


def largest(faces: list[F.Face]) -> F.Face | None:
    return max(faces, key=lambda f: f.size) if faces else None


def face_pairs(paths: list[Path], detector: str, min_score: float) -> list[tuple[F.Face, F.Face]]:
    """(MTCNN's face, ``detector``'s face) for each image where both find one with ``min_score``."""
    dets = {n: F.detector_for({**IMAGE_DEFAULTS, "detector": n}) for n in ("mtcnn", detector)}
    pairs = []
    for start in range(0, len(paths), 50):
        imgs = [Image.open(q).convert("RGB") for q in paths[start:start + 50]]
        found = {n: [largest(fs) for fs in d.detect(imgs)] for n, d in dets.items()}
        for a, b in zip(found["mtcnn"], found[detector]):
            if a is not None and b is not None and min(a.score, b.score) >= min_score:
                pairs.append((a, b))
    return pairs


def symmetric(layout: np.ndarray) -> np.ndarray:
    """The layout averaged with its mirror image (left eye <-> right eye, mouth corners swapped)."""
    return (layout + layout[[1, 0, 2, 4, 3]] * [-1, 1]) / 2


def crop_gap(a: F.Face, b: F.Face, template: np.ndarray) -> np.ndarray:
    """How ``b``'s crop with ``template`` differs from ``a``'s crop with MTCNN's: the log of the
    scale ratio (> 0: ``b``'s crop shows the face larger) and where ``b``'s crop centre sits in
    ``a``'s crop (x, y), in MTCNN template units (face sizes)."""
    ma, ta = F.similarity_transform(a.landmarks, F.TEMPLATES["mtcnn"])
    mb, tb = F.similarity_transform(b.landmarks, template)
    scale = np.log(np.sqrt(abs(np.linalg.det(mb)) / abs(np.linalg.det(ma))))
    centre_b = np.linalg.solve(mb, -tb)  # the input pixel mapped to the crop centre (0, 0)
    return np.array([scale, *(ma @ centre_b + ta)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/affectnet/train", help="ImageFolder of training faces")
    p.add_argument("--detector", default="retinaface", choices=[d for d in F.FACE_DETECTORS if d != "mtcnn"])
    p.add_argument("--limit", type=int, default=1500, help="faces drawn at random (0 = all)")
    p.add_argument("--min-score", type=float, default=0.95)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    paths = sorted(q for q in Path(args.data).glob("*/*") if q.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if args.limit and len(paths) > args.limit:
        paths = random.Random(args.seed).sample(paths, args.limit)
    pairs = face_pairs(paths, args.detector, args.min_score)
    print(f"images: {len(paths)}, found confidently by both: {len(pairs)}")
    mapped = []
    for a, b in pairs:
        m, t = F.similarity_transform(a.landmarks, F.TEMPLATES["mtcnn"])
        mapped.append(np.asarray(b.landmarks, np.float64) @ m.T + t)
    layout = symmetric(np.mean(mapped, 0))
    print(f"{args.detector} landmarks in MTCNN's aligned frame (template units), symmetric:")
    for row in layout:
        print(f"    [{row[0]:.4f}, {row[1]:.4f}],")
    for name, template in (("handlers/faces.py", F.TEMPLATES[args.detector]), ("measured", layout)):
        gaps = np.array([crop_gap(a, b, template) for a, b in pairs])
        bias = gaps.mean(0)
        print(f"{args.detector}'s crops against MTCNN's, {name} template: scale {np.exp(bias[0]):.3f}x on average "
              f"(per face |log| median {np.median(np.abs(gaps[:, 0])):.3f}), centre offset "
              f"({bias[1]:+.4f}, {bias[2]:+.4f}) face sizes on average")


if __name__ == "__main__":
    main()
