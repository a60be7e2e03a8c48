"""Attribution methods for the explanations API compared on real faces: faithfulness (deletion
of the 10% most-attributed pixels against 10% random pixels and random map cells) and speed
(ms per face on the CPU). Prints a markdown table and, last, one JSON line.

    .venv/bin/python -m bench.bench_explain --threads 2

Faces: the 56 FER2013 crops of ``tests/fixtures`` (classified whole) and the group photo's
aligned faces. Models: the exported TorchScript image model (``handlers.common.load_scripted``),
as served: occlusion on the served CPU graph (``handlers.cpu_graph.optimize_for_cpu``), gradients on the plain one.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from handlers import explain, faces
from handlers.common import load_scripted
from handlers.contract import IMAGE_DEFAULTS
from handlers.cpu_graph import optimize_for_cpu
from tests.explain_faces import fixture_inputs

from .bench_model import export_weights

# method, its parameters: the candidates measured
CANDIDATES: list[tuple[str, dict]] = [
    ("occlusion", {"window": 1}),
    ("occlusion", {"window": 2}),
    ("integrated_gradients", {"steps": 16}),
    ("integrated_gradients", {"steps": 32}),
    ("gradient_x_input", {}),
    ("smoothgrad", {"samples": 16, "noise": 0.15}),
]


def ms_per_face(fn, x: torch.Tensor, repeats: int, clock=time.perf_counter) -> float:
    """Fastest time of ``fn(x)`` over ``repeats`` calls, per face, in ms (the fastest: on a
    shared machine the slower calls measure the neighbours). ``clock``: wall time, or
    ``time.process_time`` for this process's CPU time over all its threads, which a busy machine
    inflates far less."""
    fn(x)
    times = []
    for _ in range(repeats):
        t = clock()
        fn(x)
        times.append(clock() - t)
    return 1000 * min(times) / x.shape[0]


def forward_faces_per_s(model, x: torch.Tensor, repeats: int) -> float:
    """The served graph's plain forward speed on a batch of 64 crops (faces/s): the reference
    against which the explanation times can be read on a busy machine."""
    batch = x[:1].expand(64, *x.shape[1:]).contiguous()
    with torch.inference_mode():
        return 64 / (ms_per_face(model, batch, repeats) * 64 / 1000)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default="pretrain/emotion_image.pth")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--only", default="", help="only the candidates whose name contains this (e.g. 'occlusion window=1')")
    p.add_argument("--out", type=Path, default=Path("bench/results/bench_explain.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        spec, path = export_weights(a.weights, tmp)
        plain, _ = load_scripted(path)
        before = rss_mb()
        second, _ = load_scripted(path)
        result: dict = {"arch": spec["arch"], "input_size": spec["input_size"], "threads": a.threads,
                        "grid": a.grid, "second_graph_rss_mb": round(rss_mb() - before, 1),
                        "torchscript_mb": round(path.stat().st_size / 2 ** 20, 2)}
        x0 = torch.zeros(2, int(spec["channels"]), int(spec["input_size"]), int(spec["input_size"]))
        fast, fast_graph = optimize_for_cpu(second, x0, lambda: load_scripted(path)[0], IMAGE_DEFAULTS["optimize"])
    x = fixture_inputs(spec, faces.FaceDetector(max_faces=20))
    with torch.inference_mode():
        target = torch.softmax(plain(x), 1).argmax(1)
    random_pixels = explain.random_drop(fast, x, target, a.fraction)
    g = torch.Generator().manual_seed(1)
    random_cells = explain.deletion_drop(fast, x, target, torch.rand(len(x), a.grid, a.grid, generator=g),
                                         a.fraction)
    result.update(faces=len(x), random_pixels_drop=round(random_pixels.mean().item(), 4),
                  random_cells_drop=round(random_cells.mean().item(), 4), methods={},
                  forward_faces_per_s_batch64=round(forward_faces_per_s(fast, x, 10 * a.repeats)),
                  forward_cpu_ms_per_face_batch64=round(ms_per_face(
                      torch.inference_mode()(fast.forward), x[:1].expand(64, *x.shape[1:]).contiguous(),
                      10 * a.repeats, time.process_time), 3),
                  load_average=[round(v, 2) for v in os.getloadavg()])
    rows = []
    for method, params in CANDIDATES:
        graph = plain if method in explain.NEEDS_GRADIENTS else fast
        name = method + "".join(f" {k}={v}" for k, v in params.items())
        if a.only not in name:
            continue
        maps = explain.attribute(graph, x, target, method, a.grid, **params)
        drop = explain.deletion_drop(fast, x, target, maps, a.fraction)
        fn = lambda batch: explain.attribute(graph, batch, target[:len(batch)], method, a.grid, **params)  # noqa: E731
        r = {"graph": fast_graph if graph is fast else "plain", "drop": round(drop.mean().item(), 4),
             "margin_vs_random_pixels": round((drop - random_pixels).mean().item(), 4),
             "margin_vs_random_cells": round((drop - random_cells).mean().item(), 4),
             "wins_vs_random_pixels": round((drop > random_pixels).float().mean().item(), 3),
             "ms_per_face_batch1": round(ms_per_face(fn, x[:1], a.repeats), 1),
             "ms_per_face_batch4": round(ms_per_face(fn, x[:4], a.repeats), 1),
             "cpu_ms_per_face_batch4": round(ms_per_face(fn, x[:4], a.repeats, time.process_time), 1)}
        result["methods"][name] = r
        print(name, r, flush=True)
        rows.append((name, r))
    print(f"| method | drop top {a.fraction:.0%} | - random pixels | - random cells | wins | ms/face b1 | ms/face b4 | CPU ms/face b4 |"
          f"  ({spec['arch']} {spec['input_size']}px, {len(x)} faces, {a.threads} threads, grid {a.grid}; "
          f"forward {result['forward_faces_per_s_batch64']} faces/s at batch 64, load {result['load_average']})")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| random pixels | {result['random_pixels_drop']:.4f} | | | | | | |")
    print(f"| random cells | {result['random_cells_drop']:.4f} | | | | | | |")
    for name, r in rows:
        print(f"| {name} | {r['drop']:.4f} | {r['margin_vs_random_pixels']:+.4f} | {r['margin_vs_random_cells']:+.4f} "
              f"| {r['wins_vs_random_pixels']:.2f} | {r['ms_per_face_batch1']:.1f} | {r['ms_per_face_batch4']:.1f} "
              f"| {r['cpu_ms_per_face_batch4']:.1f} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
