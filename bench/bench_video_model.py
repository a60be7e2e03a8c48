"""CPU speed of the hybrid video network, model only, and of its parts (frame CNN, GRU +
attention, C3D), for bidirectional and one-way GRUs. Prints a markdown table and, last, one JSON
line. Reports the minimum and the median over repeats: on a shared machine the minimum is the
figure that shows the model's own cost.

    .venv/bin/python -m bench.bench_video_model --threads 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

from model_defs import create_model, default_spec


def timed(fn, x: torch.Tensor, reps: int) -> tuple[float, float]:
    """(min, median) ms per call."""
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn(x)
            ts.append((time.perf_counter() - t) * 1000)
    return min(ts), statistics.median(ts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--arch", default="emo_video_hybrid")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    rows, result = [], {"arch": a.arch, "threads": a.threads}
    for bi in (True, False):
        spec = default_spec(a.arch)
        spec.extra["bidirectional"] = bi
        model = create_model(a.arch, spec).eval()
        scripted = torch.jit.script(model)
        name = "bi-GRU" if bi else "GRU"
        params = sum(p.numel() for p in model.parameters()) / 1e6
        c, t, s = spec.channels, spec.clip_len, spec.input_size
        for n in (1, 4):
            lo, med = timed(scripted, torch.randn(n, c, t, s, s), a.reps)
            rows.append((f"{name} full, {n} clip(s)", lo / n, med / n))
            result[f"{'bi' if bi else 'uni'}_b{n}_ms_per_clip_min"] = round(lo / n, 2)
        x = torch.randn(1, c, t, s, s)
        feats = model.frame_features(x)
        rows.append((f"{name} GRU + attention, 1 clip", *timed(model.temporal_pool, feats, a.reps)))
        if bi:
            frames = x.permute(0, 2, 1, 3, 4).reshape(t, c, s, s)
            cnn = timed(model.frame_cnn.forward_features, frames, a.reps)
            rows.append((f"frame CNN ({spec.extra['frame_arch']}), {t} frames", *cnn))
            rows.append(("C3D branch, 1 clip", *timed(model.c3d, x, a.reps)))
        result[f"{'bi' if bi else 'uni'}_params_m"] = round(params, 2)
    print(f"| part | min ms/clip | median ms/clip |  ({a.arch}, cpu, {a.threads} threads)")
    print("|---|---|---|")
    for name, lo, med in rows:
        print(f"| {name} | {lo:.1f} | {med:.1f} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
