"""In-process speed of an exported model (TorchScript, CPU by default): batch-1 latency and
throughput at several batch sizes, on the CPU graph the handlers serve (``--optimize``, default
the handlers' own, ``handlers/cpu_graph.py``). Prints a markdown table and, last, one JSON line.

    .venv/bin/python -m bench.bench_model --weights pretrain/emotion_image.pth --threads 2
    .venv/bin/python -m bench.bench_model --optimize off    # the exported graph as it is
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from export.torchscript import example_input, export_torchscript
from handlers.common import load_scripted
from handlers.contract import CPU_GRAPHS, IMAGE_DEFAULTS
from handlers.cpu_graph import optimize_for_cpu
from model_defs import load_model


def time_batches(model, x: torch.Tensor, seconds: float) -> list[float]:
    """Per-call wall times (s) of ``model(x)`` repeated for about ``seconds``."""
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 5:
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return times


def export_weights(weights: str | Path, folder: str | Path) -> tuple[dict, Path]:
    """The weights' spec, and the weights exported to TorchScript as ``folder/model.pt``."""
    model = load_model(weights)
    spec = model.spec.to_dict()
    return spec, export_torchscript(model, spec, Path(folder) / "model.pt")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default="pretrain/emotion_image.pth")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="1,8,32,64,128")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--optimize", choices=CPU_GRAPHS, default=IMAGE_DEFAULTS["optimize"],
                   help="the CPU graph (handler option optimize; default: the served one)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        spec, path = export_weights(a.weights, tmp)
        scripted, _ = load_scripted(path, a.device)
        scripted, graph = optimize_for_cpu(scripted, example_input(spec, 2).to(a.device),
                                           lambda: load_scripted(path, a.device)[0], a.optimize)
    rows, result = [], {"arch": spec["arch"], "threads": a.threads, "device": a.device, "cpu_graph": graph,
                        "weights_mb": round(Path(a.weights).stat().st_size / 2**20, 2)}
    for b in map(int, a.batches.split(",")):
        x = example_input(spec, b).to(a.device)
        t = time_batches(scripted, x, a.seconds)
        med = statistics.median(t)
        rows.append((b, med * 1000, med * 1000 / b, b / med))
        result[f"b{b}_ms"] = round(med * 1000, 3)
        result[f"b{b}_items_per_s"] = round(b / med, 1)
    print(f"| batch | median ms/batch | ms/item | items/s |  ({spec['arch']}, {a.device}, {a.threads} threads, "
          f"CPU graph {graph})")
    print("|---|---|---|---|")
    for b, ms, per, ips in rows:
        print(f"| {b} | {ms:.2f} | {per:.3f} | {ips:.0f} |")
    result["best_items_per_s"] = max(r[3] for r in rows)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
