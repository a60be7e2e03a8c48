"""Compare serving settings of the image archive in one TorchServe run: each variant is the same
model archived under its own name with its own batch size, delay, workers, threads per worker
and handler options; each gets the same crop load (REST) in turn, round-robin, ``--rounds`` times.

    .venv/bin/python -m bench.tune_image --variants b8d20w1t0,b16d5w2t1,b32d5w1t2 --concurrency 8,32

Variant syntax: ``b<batchSize>d<maxBatchDelay ms>w<workers>t<threads per worker, 0 = cores/workers>``
and optional flags ``+onednn`` / ``+mkldnn`` / ``-opt`` (handler option ``optimize``, the CPU graph;
``+opt``: the default one) or ``+name`` / ``-name`` for another boolean handler option. Prints a
markdown table and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.loadgen import RestClient, run_load
from bench.serve_bench import crop_payloads
from export.archive import build_archive, model_config_for
from export.torchscript import export_torchscript
from handlers.contract import CPU_GRAPHS
from model_defs import create_model, load_model, save_weights
from serving import running_server

REPO = Path(__file__).resolve().parents[1]

log = logging.getLogger("tune_image")
VARIANT = re.compile(r"b(\d+)d(\d+)w(\d+)t(\d+)((?:[+-]\w+)*)")


def parse_variant(text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    m = VARIANT.fullmatch(text)
    if not m:
        raise SystemExit(f"bad variant {text!r}: want e.g. b16d5w2t1+opt")
    b, d, w, t, flags = m.groups()
    cfg = {"batchSize": int(b), "maxBatchDelay": int(d), "minWorkers": int(w), "maxWorkers": int(w)}
    handler = {"threads": int(t)}
    for sign, name in re.findall(r"([+-])(\w+)", flags):
        if name in CPU_GRAPHS and sign == "+":
            handler["optimize"] = name
        else:
            handler["optimize" if name == "opt" else name] = sign == "+"
    return cfg, handler


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", required=True)
    p.add_argument("--concurrency", default="32")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--weights", type=Path, default=REPO / "pretrain" / "emotion_image.pth")
    a = p.parse_args(argv)
    variants = a.variants.split(",")
    levels = [int(c) for c in a.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="tune-image-") as tmp:
        work = Path(tmp)
        w = a.weights
        if not w.is_file():
            torch.manual_seed(0)
            w = work / "random.pth"
            save_weights(create_model("emo_resnet_s"), w)
        model = load_model(w)
        spec = model.spec.to_dict()
        ts_path = export_torchscript(model, spec, work / "model.pt")
        store = work / "store"
        models = []
        for i, v in enumerate(variants):
            cfg, handler = parse_variant(v)
            sub = work / f"v{i}"
            mar = build_archive("image", ts_path, spec, sub, model_config=model_config_for("image", cfg, handler))
            store.mkdir(exist_ok=True)
            mar.rename(store / f"v{i}.mar")
            models.append(f"v{i}=v{i}.mar")
        crops = crop_payloads()
        results: dict[str, dict[int, list[float]]] = {v: {c: [] for c in levels} for v in variants}
        with running_server(store, models, work / "server", timeout=600) as ts:
            auth = ts.auth("inference")
            for r in range(a.rounds):
                for i, v in enumerate(variants):
                    url = ts.predictions_url(f"v{i}")
                    for c in levels:
                        res = run_load(lambda: RestClient(url, auth), crops, c, a.requests, a.seconds, name=v)
                        log.info("round %d %s c=%d: %.1f req/s p50 %.1f p99 %.1f errors %d %s", r, v, c,
                                 res.rps, res.p50_ms, res.p99_ms, res.errors, res.first_error)
                        results[v][c].append(res.rps)
    print("| variant | " + " | ".join(f"c={c} req/s (median of {a.rounds})" for c in levels) + " |")
    print("|---|" + "---|" * len(levels))
    summary = {}
    for v in variants:
        meds = [statistics.median(results[v][c]) for c in levels]
        summary[v] = {str(c): {"median": m, "all": results[v][c]} for c, m in zip(levels, meds)}
        print(f"| {v} | " + " | ".join(f"{m:.1f}" for m in meds) + " |")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
