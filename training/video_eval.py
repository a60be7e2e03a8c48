"""``training.evaluate --task video``: labelled videos through the serving pipeline, per pooling.

Each video goes through ``handlers.video_pipeline`` exactly as the handler runs it (sampling,
keyframe detection and tracking, alignment; the main person answers), with the checkpoint's
network in eager mode scored as the export compiles it (``model_defs.inference_model``). A
per-frame model's frame probabilities are computed once per video and pooled every way asked
for, so ``--pooling mean,window`` compares the per-frame mean baseline with the expressive
window on the very same frames. A clip model (e.g. ``emo_video_hybrid``) scores its own clips
(pooling ``model``).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from handlers.contract import VIDEO_DEFAULTS
from handlers.faces import detector_for
from handlers.video_pipeline import VideoPipeline, is_frame_model, run_one
from handlers.video_pool import POOLINGS, pooling_from_spec
from model_defs import inference_model, load_model

from .metrics import classification_metrics
from .clip_datasets import ClipDataset, named_clips, video_dataset

log = logging.getLogger("training.evaluate")

MODEL_POOLING = "model"
"""``--pooling`` name for a clip model's own temporal pooling (its forward pass over the clip)."""


def labelled_videos(data: str | Path, from_names: bool, spec: dict[str, Any]) -> ClipDataset:
    """The clips to score: ``labels.csv``, class folders, or (``from_names``) emotions in file names."""
    return named_clips(data, spec) if from_names else video_dataset(data, spec)


def evaluate_videos(args: argparse.Namespace, weights: Path) -> dict[str, Any]:
    """Score every labelled video under ``args.data``; one result per pooling."""
    model = load_model(weights, map_location=args.device)
    spec = model.spec.to_dict()
    net = inference_model(model).eval()
    frame_model = is_frame_model(spec)
    poolings = list(dict.fromkeys(p for p in (args.pooling or "").split(",") if p)) or \
        ([pooling_from_spec(spec)[0]] if frame_model else [MODEL_POOLING])
    allowed = POOLINGS if frame_model else (MODEL_POOLING,)
    bad = [p for p in poolings if p not in allowed]
    if bad:
        raise SystemExit(f"--pooling {','.join(bad)}: this model ({spec['arch']}) takes {', '.join(allowed)}")
    options = {**VIDEO_DEFAULTS, "detection": args.video_detection}
    if args.keyframe_every:
        options["keyframe_every"] = args.keyframe_every
    detector = None if options["detection"] == "never" else detector_for(
        options, args.device, max_faces=int(options["max_people"]))
    pipeline = VideoPipeline(spec, options, detector)
    clips = labelled_videos(args.data, args.labels_from_names, spec)
    names = list(spec["labels"])

    def score(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return net(x.to(args.device)).float().softmax(-1).cpu()

    per_pooling: dict[str, list[torch.Tensor]] = {p: [] for p in poolings}
    rows = []
    for path, label in zip(clips.sources, clips.labels):
        req = run_one(pipeline, path, score)
        main = req.people[0]
        row = {"clip": path.name, "truth": names[label], "people": sum(p.track is not None for p in req.people),
               "sampled": len(req.sampled), "detected": req.tracker.detected_frames() if req.tracker else 0}
        for p in poolings:
            if p == MODEL_POOLING:
                probs = main.probs[0]
            else:
                probs = pipeline.pool(torch.stack([main.frame_probs[i] for i in main.clips[0]]), p)
            per_pooling[p].append(probs)
            row[p] = names[int(probs.argmax())]
        rows.append(row)
        log.info("%s", row)
    targets = torch.tensor(clips.labels)
    results = {p: classification_metrics(torch.stack(v), targets, names) for p, v in per_pooling.items()}
    return {"n": len(rows), "poolings": poolings, "results": results, "clips": rows,
            "keyframe_every": options["keyframe_every"], "detection": options["detection"]}


def markdown(result: dict[str, Any]) -> str:
    """Per-clip predictions and accuracy per pooling, as a markdown table."""
    ps = result["poolings"]
    lines = ["| clip | truth | " + " | ".join(ps) + " |", "|---|---|" + "---|" * len(ps)]
    lines += [f"| {r['clip']} | {r['truth']} | " + " | ".join(r[p] for p in ps) + " |" for r in result["clips"]]
    lines.append("| **top-1** | | " + " | ".join(f"{result['results'][p]['acc']:.3f}" for p in ps) + " |")
    return "\n".join(lines)
