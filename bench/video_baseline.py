"""Video model vs the per-frame baseline (the image model on the same 16 frames, probabilities
averaged) on labelled clips. Prints a markdown table and, last, one JSON line.

    .venv/bin/python -m bench.video_baseline --data ../shared/data/videos/labelled --detect-faces
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from model_defs import LABELS, load_model
from training.video_data import video_eval_dataset


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/videos/labelled")
    p.add_argument("--image-weights", default="pretrain/emotion_image.pth")
    p.add_argument("--video-weights", default="pretrain/emotion_video.pth")
    p.add_argument("--detect-faces", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    if not Path(a.data).exists():
        print(f"skipped: {a.data} not found")
        return
    torch.set_num_threads(a.threads)
    image, video = load_model(a.image_weights), load_model(a.video_weights)
    ds = video_eval_dataset(a.data, video.spec.to_dict(), detect_faces=a.detect_faces)
    rows, hits = [], {"baseline": 0, "video": 0}
    for i in range(len(ds)):
        clip, label = ds[i]  # (C, T, S, S)
        frame_probs = image(clip.permute(1, 0, 2, 3)).softmax(-1).mean(0)
        video_probs = video(clip[None]).softmax(-1)[0]
        b, v = int(frame_probs.argmax()), int(video_probs.argmax())
        hits["baseline"] += b == label
        hits["video"] += v == label
        rows.append((ds.sources[i].name, LABELS[label], LABELS[b], LABELS[v]))
    print("| clip | truth | per-frame baseline | video model |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    n = len(ds)
    print(json.dumps({"n": n, "baseline_acc": hits["baseline"] / n, "video_acc": hits["video"] / n,
                      "detect_faces": a.detect_faces}))


if __name__ == "__main__":
    main()
