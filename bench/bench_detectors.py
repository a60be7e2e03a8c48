"""The face detectors side by side (MTCNN and RetinaFace, ``handlers.faces``), in one run:

1. in process, ``--threads`` torch threads (1: as each of the image archive's 2 workers): ms of
   detection per photo on the news photos (``shared/data/photos``), one photo per call and
   ``--batch`` photos per call, median of 5 passes, the detectors taking turns on every 24 photos;
2. faces found on those photos and on ``--frames`` frames of each unlabelled clip
   (``shared/data/videos/unlabelled``, detected as the video handler does: 640 px, up to 8 faces):
   counts, and agreement with MTCNN (a face matched when a box of the other detector overlaps it
   with IoU >= 0.5);
3. the pipeline's top-1 on the 215 labelled photos (``training.evaluate --detect-faces``'s
   scoring, with the shipped image weights) per detector (``--no-accuracy`` skips it);
4. served: the image and video archives built twice, handler option ``detector: mtcnn`` and the
   default, in one TorchServe; photos with detection over REST at concurrency 8 and 32 and the 4 s
   1080p five-face clip at concurrency 1, each MTCNN first and RetinaFace right after.

    .venv/bin/python -m bench.bench_detectors [--threads 1] [--quick]

Prints a markdown table and, last, one JSON line; the JSON goes to bench/results/ too.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from bench.loadgen import LoadResult, RestClient, run_load
from bench.serve_bench import RESULTS, SHARED, photo_payloads, street_clip, weights
from export.archive import model_config_for, run_archiver, shared_handler_modules
from export.torchscript import export_torchscript
from handlers import faces as F
from handlers.contract import FACE_DETECTORS, IMAGE_DEFAULTS, VIDEO_DEFAULTS
from handlers.video_decode import VideoLimits, read_clip, sample_indices
from model_defs import load_model
from serving import machine_lock, serving

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_detectors")
MATCH_IOU = 0.5


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def matched(faces: list[F.Face], others: list[F.Face]) -> int:
    """How many of ``faces`` have a face of ``others`` with IoU >= MATCH_IOU (each used once)."""
    free, n = list(others), 0
    for f in faces:
        best = max(free, key=lambda o: iou(f.box, o.box), default=None)
        if best is not None and iou(f.box, best.box) >= MATCH_IOU:
            free.remove(best)
            n += 1
    return n


def detection_ms(dets: dict[str, F.Detector], images: list[Image.Image], batch: int, repeat: int) -> dict[str, float]:
    """Per detector, the median over ``repeat`` passes of the ms per image, ``batch`` images per
    detect call. The detectors take turns on each chunk of :data:`CHUNK` images (the order swapped
    every pass), so a machine whose speed drifts from minute to minute slows both alike."""
    for det in dets.values():
        det.detect(images[:batch])  # warm-up
    chunk = max(batch, CHUNK // batch * batch)
    runs: dict[str, list[float]] = {name: [] for name in dets}
    for r in range(repeat):
        spent = dict.fromkeys(dets, 0.0)
        for k in range(0, len(images), chunk):
            part = images[k:k + chunk]
            for name in (list(dets) if r % 2 == 0 else list(reversed(dets))):
                t = time.perf_counter()
                for j in range(0, len(part), batch):
                    dets[name].detect(part[j:j + batch])
                spent[name] += time.perf_counter() - t
        for name in dets:
            runs[name].append(1000 * spent[name] / len(images))
    return {name: statistics.median(v) for name, v in runs.items()}


CHUNK = 24
"""Images per turn in :func:`detection_ms`."""


def agreement(found: dict[str, list[list[F.Face]]]) -> dict[str, Any]:
    """Counts per detector and how many of MTCNN's faces the others match (and the reverse)."""
    base = found["mtcnn"]
    out: dict[str, Any] = {}
    for name, per_image in found.items():
        row = {"faces": sum(map(len, per_image)), "images_with_a_face": sum(bool(f) for f in per_image),
               "images": len(per_image)}
        if name != "mtcnn":
            row["mtcnn_faces_matched"] = sum(matched(b, f) for b, f in zip(base, per_image))
            row["faces_matched_by_mtcnn"] = sum(matched(f, b) for b, f in zip(base, per_image))
        out[name] = row
    return out


def clip_frames(n: int) -> list[Image.Image]:
    """``n`` evenly spread frames of every unlabelled clip (none without shared data)."""
    frames: list[Image.Image] = []
    for path in sorted((SHARED / "videos" / "unlabelled").glob("*")):
        try:
            video = read_clip(path.read_bytes(), lambda info: sample_indices(info.n_frames, n),
                              VideoLimits.from_mapping(dict(VIDEO_DEFAULTS)))
        except Exception as e:  # noqa: BLE001 - a clip that cannot be read is reported and skipped
            log.warning("%s: %s", path.name, e)
            continue
        frames += [f.convert("RGB") for f in video.frames]
    return frames


def in_process(args: argparse.Namespace, photos: list[Image.Image]) -> dict[str, Any]:
    image_dets = {name: F.detector_for({**IMAGE_DEFAULTS, "detector": name}) for name in FACE_DETECTORS}
    video_dets = {name: F.detector_for({**VIDEO_DEFAULTS, "detector": name}, max_faces=int(VIDEO_DEFAULTS["max_people"]))
                  for name in FACE_DETECTORS}
    repeat = 1 if args.quick else 5
    out: dict[str, Any] = {"ms_per_photo": {name: {} for name in image_dets}}
    for b in (1, args.batch):
        for name, ms in detection_ms(image_dets, photos, b, repeat).items():
            out["ms_per_photo"][name][f"batch {b}"] = round(ms, 2)
    log.info("ms per photo: %s", out["ms_per_photo"])
    out["photos"] = agreement({n: d.detect(photos) for n, d in image_dets.items()})
    frames = clip_frames(args.frames)
    if frames:
        out["clip_frames"] = agreement({n: d.detect(frames) for n, d in video_dets.items()})
    return out


def accuracy(quick: bool) -> dict[str, Any]:
    """The pipeline's top-1 / top-3 on the labelled photos, per detector."""
    from model_defs import SHIPPED_WEIGHTS
    from training.evaluate import score_images

    data = SHARED / "photos"
    if not (data / "labels.csv").is_file() or quick:
        return {}
    model = load_model(SHIPPED_WEIGHTS["image"])
    out = {}
    for name in FACE_DETECTORS:
        r = score_images(model, data, "cpu", "auto", detector=name)
        out[name] = {"acc": round(r["acc"], 4), "acc_top3": round(r["acc_top3"], 4), "n": r["n"]}
    return out


def served(args: argparse.Namespace, work: Path) -> list[LoadResult]:
    """Both detectors' archives in one TorchServe; the loads run MTCNN first, then RetinaFace."""
    store = work / "model_store"
    store.mkdir()
    models = []
    for task, path in (("image", args.image_weights), ("video", args.video_weights)):
        w, _ = weights(path, "emo_resnet_s" if task == "image" else "emo_video_frames", work, True, task)
        model = load_model(w)
        spec = model.spec.to_dict()
        ts = export_torchscript(model, spec, work / f"{task}.pt")
        for name in FACE_DETECTORS:
            archive = f"emotion_{task}_{name}"
            run_archiver(archive, ts, str(REPO / "handlers" / f"{task}_handler.py"), list(spec["labels"]),
                         model_config_for(task, None, {"detector": name}), store, "1.0", shared_handler_modules())
            models.append(f"{archive}={archive}.mar")
    photos, _ = photo_payloads(64 if args.quick else 200)
    street = street_clip()
    n_photos, t_photos = (60, 8.0) if args.quick else (600, 20.0)
    rows: list[LoadResult] = []
    with machine_lock(), serving(store, models, work / "server", REPO / "config.properties", 600) as ts:
        auth = ts.auth("inference")

        def load(model: str, name: str, payloads: list[bytes], conc: int, n: int, t: float,
                 warmup: int | None = None) -> None:
            url = ts.predictions_url(model)
            r = run_load(lambda: RestClient(url, auth), payloads, conc, n, t, warmup=warmup, name=name)
            log.info("%s c=%d: %.1f req/s, p50 %.1f ms, %d errors %s", name, conc, r.rps, r.p50_ms, r.errors,
                     r.first_error)
            rows.append(r)

        for conc in (8, 32):
            for name in ("mtcnn", "retinaface"):
                load(f"emotion_image_{name}", f"photos REST, detection, {name}", photos, conc, n_photos, t_photos)
        if street is not None:
            for name in ("mtcnn", "retinaface"):
                load(f"emotion_video_{name}", f"4 s 1080p clip, 5 faces, {name}", [street[0]], 1,
                     2 if args.quick else 6, 90.0, warmup=1)
    return rows


def table(inproc: dict[str, Any], acc: dict[str, Any], rows: list[LoadResult], batch: int) -> str:
    lines = ["| figure | MTCNN | RetinaFace | RetinaFace / MTCNN |", "|---|---|---|---|"]

    def add(label: str, m: float, r: float, better_low: bool) -> None:
        ratio = (m / r if better_low else r / m) if m and r else float("nan")
        lines.append(f"| {label} | {m:g} | {r:g} | {ratio:.2f}x |")

    ms = inproc["ms_per_photo"]
    for key in ("batch 1", f"batch {batch}"):
        add(f"detection, ms per photo, {key}", ms["mtcnn"][key], ms["retinaface"][key], True)
    by = {(r.name.rsplit(", ", 1)[0], r.name.rsplit(", ", 1)[1], r.concurrency): r for r in rows}
    for conc in (8, 32):
        m, r = by.get(("photos REST, detection", "mtcnn", conc)), by.get(("photos REST, detection", "retinaface", conc))
        if m and r:
            add(f"photos with detection, REST, c={conc}, req/s", m.rps, r.rps, False)
            add(f"photos with detection, REST, c={conc}, p50 ms", m.p50_ms, r.p50_ms, True)
    m, r = by.get(("4 s 1080p clip, 5 faces", "mtcnn", 1)), by.get(("4 s 1080p clip, 5 faces", "retinaface", 1))
    if m and r:
        add("4 s 1080p clip, five faces, REST, c=1, p50 ms", m.p50_ms, r.p50_ms, True)
    for part, label in (("photos", "photos"), ("clip_frames", "unlabelled clip frames")):
        if part in inproc:
            a = inproc[part]
            add(f"{label}: faces found ({a['mtcnn']['images']} images)", a["mtcnn"]["faces"], a["retinaface"]["faces"], False)
            add(f"{label}: images with a face", a["mtcnn"]["images_with_a_face"], a["retinaface"]["images_with_a_face"], False)
            lines.append(f"| {label}: MTCNN's faces also found (IoU >= {MATCH_IOU}) | | "
                         f"{a['retinaface']['mtcnn_faces_matched']} of {a['mtcnn']['faces']} | |")
    if acc:
        add(f"pipeline top-1 on the {acc['mtcnn']['n']} labelled photos", acc["mtcnn"]["acc"], acc["retinaface"]["acc"], False)
        add("pipeline top-3 on the labelled photos", acc["mtcnn"]["acc_top3"], acc["retinaface"]["acc_top3"], False)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads in process (1: as a served worker)")
    p.add_argument("--batch", type=int, default=8, help="photos per detect call, batched")
    p.add_argument("--frames", type=int, default=8, help="frames per unlabelled clip")
    p.add_argument("--image-weights", type=Path, default=REPO / "pretrain" / "emotion_image.pth")
    p.add_argument("--video-weights", type=Path, default=REPO / "pretrain" / "emotion_video.pth")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--no-serve", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer photos and requests")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    files = sorted((SHARED / "photos" / "images").glob("*.jpg")) or sorted((REPO / "tests" / "fixtures" / "photos").glob("*.jpg"))
    photos = [Image.open(f).convert("RGB") for f in files[: 24 if args.quick else None]]
    result: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": args.threads,
                              "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "photos": len(photos)}
    result["in_process"] = in_process(args, photos)
    result["accuracy"] = {} if args.no_accuracy else accuracy(args.quick)
    rows: list[LoadResult] = []
    if not args.no_serve:
        with tempfile.TemporaryDirectory(prefix="bench-detectors-") as tmp:
            rows = served(args, Path(tmp))
    result["served"] = [r.to_dict() for r in rows]
    result["loadavg_end"] = os.getloadavg()
    print(table(result["in_process"], result["accuracy"], rows, args.batch))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"detectors-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
