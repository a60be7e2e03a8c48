"""Does a face aligned from a real photo look framed like the FER2013 crops the model trains on?

Measures, the same way on both, where MTCNN finds the face inside a crop: the eye height (mean
eye y as a fraction of the crop side, from the top), the face size (sqrt of box area over the
crop side: 1 / (1 + 2 * margin)) and the horizontal centre. FER2013: val crops upscaled to
--side. Photos: the largest face of each photo in --photos, aligned by handlers.faces at --side
(the handler's alignment, DEFAULT_MARGIN). Both are edge-padded before re-detection, as in
tools/measure_face_template.py. Also prints the spread of the photo crops (the detector's box
noise after alignment), which the training crop jitter (training.augment) should cover.

    .venv/bin/python tools/measure_photo_framing.py --photos ../shared/data/photos/images \
        --fer ../shared/data/fer2013/val --limit 600 [--detector retinaface]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from handlers import faces as F  # noqa: E402
from tools.measure_face_template import pad  # noqa: E402


def framing(det: F.FaceDetector, crops: list[Image.Image], side: int, pad_px: int) -> np.ndarray:
    """Per crop with a confident face: (eye height, face size, centre x), in crop-side units."""
    rows = []
    for start in range(0, len(crops), 32):
        batch = [pad(c.convert("RGB").resize((side, side), Image.BICUBIC), pad_px) for c in crops[start:start + 32]]
        for faces in det.detect(batch):
            if faces and faces[0].score >= 0.95:
                f = faces[0]
                lm = (np.array(f.landmarks) - pad_px) / side
                box = (np.array(f.box) - pad_px) / side
                rows.append((lm[:2, 1].mean(), f.size / side, (box[0] + box[2]) / 2))
    return np.array(rows)


def describe(name: str, rows: np.ndarray, n: int) -> None:
    q = lambda col: np.percentile(rows[:, col], [25, 50, 75])  # noqa: E731
    print(f"{name:>8}: {len(rows)}/{n} crops measured | eye height {q(0)[1]:.3f} (IQR {q(0)[0]:.3f}-{q(0)[2]:.3f}) | "
          f"face size {q(1)[1]:.3f} (IQR {q(1)[0]:.3f}-{q(1)[2]:.3f}) = margin {(1 / q(1)[1] - 1) / 2:.3f} | "
          f"centre x {q(2)[1]:.3f} (IQR {q(2)[0]:.3f}-{q(2)[2]:.3f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", default="../shared/data/photos/images")
    p.add_argument("--fer", default="../shared/data/fer2013/val")
    p.add_argument("--side", type=int, default=160)
    p.add_argument("--pad", type=int, default=40)
    p.add_argument("--limit", type=int, default=600, help="FER crops to measure (0 = all)")
    p.add_argument("--align-side", type=int, default=48,
                   help="photos are aligned at this side (the model's), then upscaled like the FER crops")
    p.add_argument("--margin", type=float, default=None, help="alignment margin to check (default: DEFAULT_MARGIN)")
    p.add_argument("--y-shift", type=float, default=None, help="template shift to check (default: FACE_Y_SHIFT)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--detector", default="mtcnn", choices=F.FACE_DETECTORS,
                   help="the detector whose faces are aligned from the photos (with its template); "
                        "the measuring stick is MTCNN for both sets")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    det = F.FaceDetector(min_face_size=args.side // 4, max_faces=1)
    fer = sorted(Path(args.fer).glob("*/*.png")) + sorted(Path(args.fer).glob("*/*.jpg"))
    if args.limit:
        fer = fer[::max(1, len(fer) // args.limit)][:args.limit]
    fer_rows = framing(det, [Image.open(f) for f in fer], args.side, args.pad)

    photo_det = F.make_detector(args.detector)
    aligned = []
    photos = sorted(Path(args.photos).glob("*.jpg"))
    for path in photos:
        img = Image.open(path).convert("RGB")
        found = photo_det.detect([img])[0]
        if found:
            aligned.append(F.align_face(img, found[0], args.align_side, args.margin, args.y_shift))
    photo_rows = framing(det, aligned, args.side, args.pad)
    print(f"photos with a detected face: {len(aligned)}/{len(photos)}")
    describe("FER2013", fer_rows, len(fer))
    describe("photos", photo_rows, len(aligned))
    d = np.median(photo_rows, 0) - np.median(fer_rows, 0)
    print(f"photo - FER medians: eye height {d[0]:+.3f}, face size {d[1]:+.3f}, centre x {d[2]:+.3f} (crop sides)")
    # what matches them: zoom by k (face size ratio), then move the landmarks down to FER's eye height
    margin = args.margin or F.DEFAULT_MARGIN
    shift = F.FACE_Y_SHIFT if args.y_shift is None else args.y_shift
    k = np.median(fer_rows[:, 1]) / np.median(photo_rows[:, 1])
    new_margin = ((1 + 2 * margin) / k - 1) / 2
    new_shift = np.median(fer_rows[:, 0]) - 0.5 - k * (np.median(photo_rows[:, 0]) - 0.5 - shift)
    print(f"to match FER2013: margin {new_margin:.4f} (now {margin:.4f}), y_shift {new_shift:+.4f} (now {shift:+.4f})")
    sd = photo_rows.std(0)
    print(f"photo crop spread (std): eye height {sd[0]:.3f}, face size {sd[1] / np.median(photo_rows[:, 1]):.1%} "
          f"relative, centre x {sd[2]:.3f}")


if __name__ == "__main__":
    main()
