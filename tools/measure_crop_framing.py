"""How much of an answer is the crop? The aligned face (handlers.faces.align_face, what serving
classifies) against the detector's plain box crop (handlers.faces.box_crop, what ``fer`` and most
tools classify) at several margins, and blends of the two (probabilities averaged), scored with
the same weights on the same detections.

Data: the labelled photos (``labels.csv``: each photo's largest face) and the labelled clips
(``labels.csv``: the largest face of every --clip-every-th frame, scored against the clip's
label). Prints a markdown table and, last, one JSON line.

    .venv/bin/python tools/measure_crop_framing.py --photos ../shared/data/photos \
        --clips ../shared/data/videos/labelled [--weights pretrain/emotion_image.pth]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from handlers.faces import FaceDetector, align_face, box_crop  # noqa: E402
from handlers.preprocess import decode_image, normalize, to_uint8  # noqa: E402
from handlers.video_decode import decode_video, probe_video  # noqa: E402
from model_defs import SHIPPED_WEIGHTS, inference_model, load_model  # noqa: E402
from training.labelled_files import read_labels_csv  # noqa: E402

BOX_MARGINS = (0.0, 0.1, 0.2, 0.3)


def labelled_faces(images: list[tuple[Image.Image, int]], det: FaceDetector) -> list[tuple[Image.Image, object, int]]:
    """(image, its largest detected face, label) for every image in which a face is found."""
    out = []
    for (img, label), faces in zip(images, det.detect([img for img, _ in images])):
        if faces:
            out.append((img, faces[0], label))
    return out


def photo_items(folder: Path) -> list[tuple[Image.Image, int]]:
    files, labels = read_labels_csv(folder / "labels.csv", ("image", "file", "path"), "images", "images")
    return [(decode_image(Path(f).read_bytes()), y) for f, y in zip(files, labels)]


def clip_items(folder: Path, every: int) -> list[tuple[Image.Image, int]]:
    files, labels = read_labels_csv(folder / "labels.csv", ("file", "video", "path"), "", "clips")
    out = []
    for f, y in zip(files, labels):
        n = probe_video(Path(f)).n_frames
        out += [(img, y) for img in decode_video(Path(f), list(range(0, n, every))).frames]
    return out


@torch.inference_mode()
def probabilities(model, spec: dict, crops: list[Image.Image]) -> torch.Tensor:
    x = torch.stack([to_uint8(c, spec) for c in crops])
    return torch.cat([model(normalize(b, spec)).softmax(-1) for b in x.split(128)])


def score(model, spec: dict, items) -> dict[str, float]:
    """Top-1 accuracy per crop rule over ``items`` (image, face, label)."""
    size, mode = int(spec["input_size"]), "L" if int(spec["channels"]) == 1 else "RGB"
    labels = torch.tensor([y for _, _, y in items])
    probs = {"aligned": probabilities(model, spec, [align_face(i.convert(mode), f, size, spec.get("face_margin"))
                                                     for i, f, _ in items])}
    for m in BOX_MARGINS:
        probs[f"box m={m}"] = probabilities(model, spec, [box_crop(i.convert(mode), f, size, m) for i, f, _ in items])
    for m in BOX_MARGINS:
        probs[f"blend aligned + box m={m}"] = (probs["aligned"] + probs[f"box m={m}"]) / 2
    return {k: float((p.argmax(1) == labels).float().mean()) for k, p in probs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=Path, help="folder with labels.csv and images/")
    p.add_argument("--clips", type=Path, help="folder with labels.csv and the clips")
    p.add_argument("--clip-every", type=int, default=10, help="score every k-th frame of each clip")
    p.add_argument("--weights", type=Path, action="append", help="weights (repeatable; default: the shipped image weights)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    det = FaceDetector()
    sets = {}
    if args.photos:
        sets["photos"] = labelled_faces(photo_items(args.photos), det)
    if args.clips:
        sets["clip frames"] = labelled_faces(clip_items(args.clips, args.clip_every), det)
    results = {}
    for w in args.weights or [SHIPPED_WEIGHTS["image"]]:
        model = load_model(w).eval()
        spec = model.spec.to_dict()
        wrapped = inference_model(model)
        results[str(w)] = {name: {"n": len(items), **score(wrapped, spec, items)} for name, items in sets.items()}
    rules = list(next(iter(next(iter(results.values())).values())).keys())[1:]
    print("| weights | data | n | " + " | ".join(rules) + " |\n|" + "---|" * (3 + len(rules)))
    for w, by_set in results.items():
        for name, r in by_set.items():
            print(f"| {Path(w).name} | {name} | {r['n']} | " + " | ".join(f"{r[k]:.3f}" for k in rules) + " |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
