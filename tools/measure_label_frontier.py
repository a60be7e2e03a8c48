"""How far apart are FER2013's folder labels and the FER+ crowd majority, for the shipped network
and for ensembles of committed weights?

On val, each set of weights (and each mean of their calibrated probabilities) is scored against
both label sets, with a per-class offset (``training.calibrate --class-bias``, fitted on the
folder labels) added at a share ``a`` of its full size: ``a = 0`` is plain temperature scaling,
``a = 1`` bias-corrected temperature scaling. One label set's gain is the other's loss where the
two disagree; the table shows how much of each a network can have at once.

    .venv/bin/python tools/measure_label_frontier.py --weights A=pretrain/emotion_image.pth \\
        T=pretrain/teacher_faceres.pth --ensembles A,T A+T --tta-flip

Prints a markdown table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_defs import load_model  # noqa: E402
from training.calibrate import collect_logits, crossval, fit_calibration  # noqa: E402
from training.datasets import image_dataset  # noqa: E402
from training.ferplus import majority_label, read_votes  # noqa: E402

SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", nargs="+", required=True, metavar="NAME=PATH")
    p.add_argument("--ensembles", nargs="+", default=None,
                   help="NAME or NAME+NAME+...: probabilities averaged (default: each set of weights alone)")
    p.add_argument("--val", default="../shared/data/fer2013/val")
    p.add_argument("--votes", default="../shared/data/fer2013/ferplus_votes.csv")
    p.add_argument("--tta-flip", action="store_true", help="mirror averaging for every network")
    p.add_argument("--threads", type=int, default=0)
    return p


def calibrated_probs(path: str, val: str, flip: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Temperature-calibrated val probabilities of one set of weights, the labels and the files."""
    model = load_model(path)
    ds = image_dataset(val, model.spec.to_dict())
    logits, labels = collect_logits(model, DataLoader(ds, batch_size=256), flip)
    t, _ = fit_calibration(logits, labels)
    return (logits / t).softmax(-1), labels, [Path(f).name for f in ds.files]


def frontier(probs: torch.Tensor, labels: torch.Tensor, crowd: torch.Tensor) -> dict:
    """Top-1 against both label sets at each share of the folder-label offset."""
    log_p = probs.clamp_min(1e-12).log()
    t, bias = fit_calibration(log_p, labels, class_bias=True)
    has_crowd = crowd >= 0
    rows = []
    for a in SHARES:
        pred = (log_p / t + a * bias).argmax(-1)
        rows.append({"share": a, "folder": float((pred == labels).float().mean()),
                     "crowd": float((pred == crowd)[has_crowd].float().mean())})
    return {"rows": rows, "bias": bias.tolist(), "folder_2fold_at_1": crossval(log_p, labels, True)["acc"]}


def main(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    named = dict(w.split("=", 1) for w in args.weights)
    scored = {n: calibrated_probs(p, args.val, args.tta_flip) for n, p in named.items()}
    labels, files = next(iter(scored.values()))[1:]
    votes = read_votes(args.votes)
    crowd = torch.tensor([m if f in votes and (m := majority_label(votes[f])) is not None else -1 for f in files])
    out = {"tta_flip": args.tta_flip, "n": len(labels), "n_crowd": int((crowd >= 0).sum()),
           "folder_equals_crowd": float((crowd == labels).float().mean()), "results": {}}
    for combo in args.ensembles or list(named):
        members = combo.split("+")
        probs = sum(scored[m][0] for m in members) / len(members)
        out["results"][combo] = frontier(probs, labels, crowd)
    print("| weights | " + " | ".join(f"offset x{a:g}: folder / crowd" for a in SHARES) + " | folder, 2-fold, x1 |")
    print("|---" * (len(SHARES) + 2) + "|")
    for combo, res in out["results"].items():
        cells = " | ".join(f"{r['folder']:.3f} / {r['crowd']:.3f}" for r in res["rows"])
        print(f"| {combo} | {cells} | {res['folder_2fold_at_1']:.3f} |")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
