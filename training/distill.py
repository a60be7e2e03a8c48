"""Distillation targets: a teacher ensemble's calibrated answers on training and unlabelled faces.

    python -m training.distill --teachers pretrain/teacher_faceres.pth pretrain/emotion_image.pth \\
        --train-dir ../shared/data/fer2013/train --photos ../shared/data/photos/images \\
        --videos ../shared/data/videos/unlabelled --out runs/distill
    python -m training.run --task image --data ../shared/data/fer2013 --distill runs/distill ...

``OUT/targets.csv`` has a header ``kind,file,<LABELS...>``: ``train`` rows name a training image
by its path relative to the training folder; ``unlabelled`` rows name a face crop under
``OUT/faces/`` (relative to OUT), detected and aligned from the photos and video frames exactly as
the handlers do it. The probabilities are the mean over teachers of each one's served answer
(mirror averaging on, then its calibrated temperature). Never point it at a validation folder.
"""
from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from handlers.faces import FaceDetector, faces_for_images
from handlers.preprocess import decode_image, to_uint8
from handlers.video_decode import read_clip, sample_at_rate
from model_defs import LABELS, load_model

from .clip_datasets import VIDEO_EXTS
from .datasets import _EncodedImages, _images_below
from .engine import predict_logits, prepare_batch
from .labelled_files import class_folders

log = logging.getLogger("training.distill")

TARGETS_CSV = "targets.csv"
FACES_DIR = "faces"
MIN_FACE_PROB = 0.98
"""Detections below this MTCNN confidence are not used as unlabelled faces."""


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Teacher targets for distillation", add_help=add_help)
    p.add_argument("--teachers", nargs="+", required=True, help="teacher checkpoints (their mean is the target)")
    p.add_argument("--train-dir", help="labelled training ImageFolder (never val)")
    p.add_argument("--photos", nargs="*", default=[], help="folders of unlabelled photos (every face is used)")
    p.add_argument("--videos", nargs="*", default=[], help="folders of unlabelled videos")
    p.add_argument("--video-fps", type=float, default=2.0, help="frames sampled per second of video")
    p.add_argument("--max-frames", type=int, default=40, help="at most this many frames per video")
    p.add_argument("--min-face", type=int, default=40, help="smallest face side (px) used from photos/videos")
    p.add_argument("--out", required=True, help="output folder (targets.csv, faces/)")
    p.add_argument("-b", "--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the teachers run (the face detector stays on the CPU)")
    return p


def _crop_settings(specs: Sequence[dict]) -> tuple[int, float | None, int]:
    """Crop side, margin and channels that serve every teacher: the largest input size, their
    common face margin, grey only when all of them are grey."""
    margins = {s.get("face_margin") for s in specs}
    if len(margins) != 1:
        raise SystemExit(f"teachers frame faces differently (face_margin {sorted(map(str, margins))})")
    return max(int(s["input_size"]) for s in specs), margins.pop(), max(int(s["channels"]) for s in specs)


def confident_faces(images: Sequence[Image.Image], detector: FaceDetector, size: int, margin: float | None,
                    channels: int, min_face: int) -> list[Image.Image]:
    """Every confident face of at least ``min_face`` px in ``images`` (detected in one batched
    call), aligned as the handlers align."""
    return [c.image for crops in faces_for_images(images, detector, "always", size, margin, channels)
            for c in crops if c.face.score >= MIN_FACE_PROB and c.face.size >= min_face]


def video_frames(path: Path, fps: float, max_frames: int) -> list[Image.Image]:
    """Frames spread over a video at about ``fps`` (the handlers' reader)."""
    return read_clip(str(path), lambda info: sample_at_rate(info, fps, 1, max_frames)).frames


def unlabelled_images(args: argparse.Namespace) -> Iterator[tuple[str, str, list[Image.Image]]]:
    """``(kind, name prefix, pictures)`` per unlabelled source: each photo (``photos``), then each
    video's sampled frames (``videos``)."""
    for f in (f for d in args.photos for f in _images_below(Path(d))):
        yield "photos", f"photo_{f.stem}", [decode_image(f.read_bytes())]
    for f in (f for d in args.videos for f in sorted(Path(d).rglob("*"))
              if f.is_file() and f.suffix.lower() in VIDEO_EXTS):
        yield "videos", f"video_{f.stem}", video_frames(f, args.video_fps, args.max_frames)


@torch.inference_mode()
def teacher_probs(teachers: Sequence[torch.nn.Module], images: Sequence[Image.Image],
                  batch_size: int = 256) -> torch.Tensor:
    """``(N, 7)`` mean over ``teachers`` of their served probabilities for ``images`` (each
    teacher runs where its weights are)."""
    total = torch.zeros(len(images), len(LABELS))
    for model in teachers:
        spec, device = model.spec.to_dict(), next(model.parameters()).device
        for s in range(0, len(images), batch_size):
            x = torch.stack([to_uint8(img, spec) for img in images[s:s + batch_size]]).to(device)
            logits = predict_logits(model, prepare_batch(x, spec), tta_flip=True)
            total[s:s + len(x)] += logits.float().softmax(-1).cpu()
    return total / max(len(teachers), 1)


def write_targets(out: Path, rows: Iterable[tuple[str, str, torch.Tensor]]) -> int:
    """Write ``targets.csv`` rows ``(kind, file, probs)``; returns how many."""
    n = 0
    with (out / TARGETS_CSV).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "file", *LABELS])
        for kind, name, p in rows:
            w.writerow([kind, name, *(f"{v:.6f}" for v in p.tolist())])
            n += 1
    return n


def read_targets(folder: str | Path) -> tuple[dict[str, torch.Tensor], list[tuple[Path, torch.Tensor]]]:
    """``targets.csv`` → (training-file path relative to its folder → probs, [(face file, probs)])."""
    folder = Path(folder)
    train: dict[str, torch.Tensor] = {}
    faces: list[tuple[Path, torch.Tensor]] = []
    with (folder / TARGETS_CSV).open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("kind", "file", *LABELS) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{folder / TARGETS_CSV}: missing columns {missing}")
        for row in reader:
            p = torch.tensor([float(row[c]) for c in LABELS])
            if row["kind"] == "train":
                train[Path(row["file"]).as_posix()] = p
            elif row["kind"] == "unlabelled":
                faces.append((folder / row["file"], p))
            else:
                raise ValueError(f"{folder / TARGETS_CSV}: unknown kind {row['kind']!r}")
    return train, faces


class SoftTargetImages(_EncodedImages):
    """Image files with a soft target each (unlabelled faces); ``labels`` are the targets' argmax."""

    def __init__(self, items: Sequence[tuple[Path, torch.Tensor]], spec: dict) -> None:
        super().__init__([f for f, _ in items], [int(p.argmax()) for _, p in items], spec)
        self.targets = torch.stack([p for _, p in items]) if items else torch.empty(0, len(LABELS))


def mix_teacher_targets(ds: _EncodedImages, teacher: dict[str, torch.Tensor], weight: float,
                        root: Path | None = None) -> int:
    """Set ``ds.targets`` to ``(1 - weight) * its target + weight * the teacher's`` for every image
    the teacher answered (others keep theirs), the images named by their path relative to ``root``
    (default: the ImageFolder's); returns how many were mixed."""
    own, n = ds.target_rows(), 0
    for i, p in enumerate(answers_for(ds, teacher, root)):
        if p is not None:
            own[i], n = (1 - weight) * own[i] + weight * p, n + 1
    ds.targets = own
    return n


def answers_for(ds: _EncodedImages, teacher: dict[str, torch.Tensor],
                root: Path | None = None) -> list[torch.Tensor | None]:
    """The teacher's answer for each of ``ds``'s images (None where it gave none), the images named
    by their path relative to ``root`` (default: the ImageFolder's)."""
    root = Path(root if root is not None else ds.root)
    return [teacher.get(Path(f).relative_to(root).as_posix()) for f in ds.files]


def with_unlabelled(ds: Dataset, faces: Sequence[tuple[Path, torch.Tensor]], spec: dict) -> Dataset:
    """``ds`` followed by the unlabelled faces with their teacher targets (``ds`` must return soft targets)."""
    return ConcatDataset([ds, SoftTargetImages(faces, spec)]) if faces else ds


def _save_faces(out: Path, faces: Sequence[Image.Image], prefix: str) -> list[str]:
    (out / FACES_DIR).mkdir(parents=True, exist_ok=True)
    names = []
    for i, img in enumerate(faces):
        name = f"{FACES_DIR}/{prefix}_{i:05d}.png"
        img.save(out / name)
        names.append(name)
    return names


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teachers = [load_model(t, map_location=args.device) for t in args.teachers]
    size, margin, channels = _crop_settings([t.spec.to_dict() for t in teachers])
    rows: list[tuple[str, str, torch.Tensor]] = []
    if args.train_dir:
        root = Path(args.train_dir)
        files, _ = class_folders(root, _images_below, "image")
        images = [decode_image(Path(f).read_bytes()) for f in files]
        probs = teacher_probs(teachers, images, args.batch_size)
        rows += [("train", Path(f).relative_to(root).as_posix(), p) for f, p in zip(files, probs)]
        log.info("teacher targets for %d training images", len(files))
    counts = {"train": len(rows), "photos": 0, "videos": 0}
    detector = FaceDetector(min_face_size=args.min_face) if args.photos or args.videos else None
    faces: list[Image.Image] = []
    names: list[str] = []
    for kind, prefix, images in unlabelled_images(args):
        got = confident_faces(images, detector, size, margin, channels, args.min_face)
        names += _save_faces(out, got, prefix)
        faces += got
        counts[kind] += len(got)
        log.info("%s: %d faces", prefix, len(got))
    rows += [("unlabelled", n, p) for n, p in zip(names, teacher_probs(teachers, faces, args.batch_size))]
    write_targets(out, rows)
    log.info("wrote %s: %s", out / TARGETS_CSV, counts)
    return counts


if __name__ == "__main__":
    main(get_args_parser().parse_args())
