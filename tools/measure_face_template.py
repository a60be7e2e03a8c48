"""Measure the FER2013 face layout that handlers/faces.py aligns to.

Runs a face detector (``--detector``: mtcnn, retinaface) on FER2013 crops upscaled to --upscale px and edge-padded by --pad px (so that
boxes are not clipped at the crop border), keeps one confident face per crop and
prints the mean landmark layout (FACE_TEMPLATE), the mean face size (FER_FACE_SIZE), the
resulting margin and the face-box coverage of the crops. Then it checks the
constants in handlers/faces.py: the similarity taking each crop's landmarks to the template
should be close to the identity.

    .venv/bin/python tools/measure_face_template.py --data ../shared/data/fer2013/val [--detector retinaface]

For a detector other than MTCNN the layout is also printed in MTCNN's face-size units
(FER_FACE_SIZE of the crop side), the units of ``faces.TEMPLATES``. The served RetinaFace
template is not this one (landmarks on upscaled 48 px crops sit otherwise than on sharp photos):
it is matched to MTCNN's crops on real colour faces by tools/measure_detector_match.py.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from handlers import faces as F  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/fer2013/val", help="ImageFolder of crops")
    p.add_argument("--upscale", type=int, default=160)
    p.add_argument("--pad", type=int, default=40,
                   help="edge-replicated border added before detection, so boxes are not clipped")
    p.add_argument("--min-score", type=float, default=0.95)
    p.add_argument("--limit", type=int, default=0, help="use at most this many crops (0 = all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--detector", default="mtcnn", choices=F.FACE_DETECTORS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    paths = sorted(q for q in Path(args.data).glob("*/*") if q.suffix.lower() in (".jpg", ".png"))
    if args.limit:
        paths = paths[::max(1, len(paths) // args.limit)][:args.limit]
    s = args.upscale
    det = F.make_detector(args.detector, min_face_size=s // 4, max_faces=1)
    lms, sizes, cover, boxes = [], [], [], []
    for start in range(0, len(paths), 64):
        imgs = [pad(Image.open(q).convert("RGB").resize((s, s), Image.BICUBIC), args.pad)
                for q in paths[start:start + 64]]
        for faces in det.detect(imgs):
            if faces and faces[0].score >= args.min_score:
                f = faces[0]
                box = np.array(f.box) - args.pad  # crop coordinates, may extend past the crop
                lms.append((np.array(f.landmarks) - args.pad) / s)
                sizes.append(f.size / s)
                clipped = box.clip(0, s)
                cover.append((clipped[2] - clipped[0]) * (clipped[3] - clipped[1]) / (s * s))
                boxes.append(box / s)
    lms, sizes, cover = np.stack(lms), np.array(sizes), np.array(cover)
    print(f"crops: {len(paths)}, with one confident face: {len(lms)} ({len(lms) / len(paths):.1%})")

    face_size = float(sizes.mean())
    template = (lms.mean(0) - 0.5) / face_size
    print(f"mean box (crop units, unclipped): {np.round(np.stack(boxes).mean(0), 4).tolist()}")
    print(f"FER_FACE_SIZE = {face_size:.4f}   (median {np.median(sizes):.4f})")
    print(f"DEFAULT_MARGIN = {(1 / face_size - 1) / 2:.4f}")
    print("measured mean layout (left eye, right eye, nose, left mouth, right mouth):")
    for row in template:
        print(f"    [{row[0]:.4f}, {row[1]:.4f}],")
    # Made left-right symmetric (FER2013 faces lean a little: ~1 deg roll, 0.3 px shift at
    # 48 px), so that aligned faces come out upright and centred.
    mirrored = template[[1, 0, 2, 4, 3]] * [-1, 1]
    print("FACE_TEMPLATE (symmetrized) =")
    for row in (template + mirrored) / 2:
        print(f"    [{row[0]:.4f}, {row[1]:.4f}],")
    if args.detector != "mtcnn":
        print(f"{args.detector} template in MTCNN face units (crop side / FER_FACE_SIZE {F.FER_FACE_SIZE}):")
        layout = (lms.mean(0) - 0.5) / F.FER_FACE_SIZE
        for row in (layout + layout[[1, 0, 2, 4, 3]] * [-1, 1]) / 2:
            print(f"    [{row[0]:.4f}, {row[1]:.4f}],")
    print(f"box coverage of the crop: median {np.median(cover):.2f}, "
          f"5th pct {np.percentile(cover, 5):.2f}, 1st pct {np.percentile(cover, 1):.2f}")

    # Check the constants in handlers/faces.py: per crop, the similarity taking its landmarks
    # (in 48 px coordinates) to the 48 px template should be ~identity.
    dst = F.template_points(48, detector=args.detector)
    sc, ang, sh = [], [], []
    for lm in lms * 48:
        m, t = F.similarity_transform(lm, dst)
        sc.append(math.sqrt(np.linalg.det(m)))
        ang.append(math.degrees(math.atan2(m[1, 0], m[0, 0])))
        sh.append(np.linalg.norm(m @ [24, 24] + t - [24, 24]))  # where the crop centre moves
    sc, ang, sh = map(np.array, (sc, ang, sh))
    print(f"aligning FER crops with the shipped constants (48 px): scale median {np.median(sc):.3f} "
          f"(IQR {np.percentile(sc, 25):.3f}-{np.percentile(sc, 75):.3f}), rotation median "
          f"{np.median(ang):+.2f} deg (|rot| median {np.median(np.abs(ang)):.2f}), centre shift "
          f"median {np.median(sh):.2f} px")


def pad(img: Image.Image, n: int) -> Image.Image:
    return Image.fromarray(np.pad(np.asarray(img), ((n, n), (n, n), (0, 0)), mode="edge"))


if __name__ == "__main__":
    main()
