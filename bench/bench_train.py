"""Training speed of the image networks on this machine: images/s of the engine's training step
(augmentation, forward, backward, SGD) per network, input size, memory format and CPU precision.
Prints a markdown table and, last, one JSON line. Run it on a quiet machine.

    .venv/bin/python -m bench.bench_train --threads 2
    .venv/bin/python -m bench.bench_train --models emo_faceres_mnv1 --sizes 96,112 --steps 10
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from model_defs import create_model, default_spec
from model_defs.spec import ModelSpec
from training.engine import FitConfig, autocast, build_optimizer
from training.augment import train_batch
from training.losses import soft_cross_entropy


def images_per_second(name: str, size: int, channels_last: bool, bf16: bool, steps: int, batch: int) -> float:
    """Mean training images/s over ``steps`` steps (after 2 warm-up steps) on random uint8 faces."""
    spec = ModelSpec.from_dict({**default_spec(name).to_dict(), "input_size": size})
    model = create_model(name, spec).train()
    cfg = FitConfig(lr=0.01, channels_last=channels_last, cpu_bf16=bf16)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg)
    g = torch.Generator().manual_seed(0)
    x8 = torch.randint(0, 256, (batch, spec.channels, size, size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, len(spec.labels), (batch,), generator=g)
    device = torch.device("cpu")
    for i in range(steps + 2):
        if i == 2:
            start = time.perf_counter()
        x, target = train_batch(x8, y, spec.to_dict(), cfg.augment, len(spec.labels))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, cfg):
            loss = soft_cross_entropy(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="emo_mobilenet_v2,emo_faceres_mnv1")
    p.add_argument("--sizes", default="", help="input sizes (default: each network's own)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("-b", "--batch-size", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [default_spec(name).input_size]
        for size in sizes:
            for cl, bf16 in ((False, False), (True, False), (True, True)):
                ips = images_per_second(name, size, cl, bf16, args.steps, args.batch_size)
                rows.append({"model": name, "size": size, "channels_last": cl, "bf16": bf16, "images_per_s": round(ips, 1)})
    print("| network | px | memory format | CPU precision | training images/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['size']} | {'channels_last' if r['channels_last'] else 'contiguous'} | "
              f"{'bf16 autocast' if r['bf16'] else 'fp32'} | {r['images_per_s']} |")
    print(json.dumps({"threads": args.threads, "batch": args.batch_size, "results": rows}))


if __name__ == "__main__":
    main()
