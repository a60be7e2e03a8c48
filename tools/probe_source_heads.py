"""Can one classifier answer every source's labels? Linear heads on a network's frozen features.

Issue 33's trade-off, split in two: is it the network's features (a bigger or longer-trained
network would fix it) or the one head that must choose between two sources' labelling habits?
On the pooled features (``forward_features``) of ``--weights``, this fits

- a head per ``--source``, on that source alone (with its own class prior): what each source's
  labels ask of these features;
- one joint head over all sources for each ``--share`` (the first source gets ``1 - share``, the
  others ``share`` split by their ``weight=``; logits offset by each source's prior against the
  first's, as ``training.run --logit-adjust 1 --prior-ref FIRST`` trains): what one served answer
  can reach;

and scores them, and the checkpoint's own head, on every ``--val`` set (top-1, happy and neutral
recall). It also fits a linear *source probe* (which source does a face look like?) and says, for
each val set and each of its classes, the share of faces that look like each source.

    .venv/bin/python tools/probe_source_heads.py --weights runs/wild_s9a/best.pth \\
        --source fer2013=../shared/data/fer2013/train,soft=../shared/data/fer2013/ferplus_votes.csv \\
        --source affectnet=../shared/data/affectnet/train,detect=auto \\
        --val fer2013=../shared/data/fer2013/val --val affectnet_served=../shared/data/affectnet/val,detect=auto \\
        --val photos=../shared/data/photos,detect=auto --share 0.2,0.4

Sources are ``training.sources`` text (soft votes and teachers included). Prints two markdown
tables, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_defs import LABELS, load_model  # noqa: E402
from training.features import pooled_features  # noqa: E402
from training.sources import Source, source_dataset  # noqa: E402

Part = tuple[torch.Tensor, torch.Tensor, float]  # features, (N, K) targets, weight


def fit_head(parts: list[Part], init: torch.nn.Linear, adjust: bool = True, steps: int = 300, lr: float = 0.01,
             weight_decay: float = 1e-4) -> torch.nn.Linear:
    """A linear head from ``init`` minimising the weighted soft cross-entropy over ``parts``; with
    ``adjust``, each part's logits get ``log(its mean target / the first part's)`` added in the loss,
    so the head answers with the first part's prior."""
    head = torch.nn.Linear(init.in_features, init.out_features)
    head.load_state_dict(init.state_dict())
    ref = parts[0][1].mean(0).clamp_min(1e-6).log()
    offsets = [(t.mean(0).clamp_min(1e-6).log() - ref) if adjust else torch.zeros_like(ref) for _, t, _ in parts]
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = weight_decay * head.weight.square().sum()
        for (f, t, w), off in zip(parts, offsets):
            if w > 0:
                loss = loss - w * (t * F.log_softmax(head(f) + off, 1)).sum(1).mean()
        loss.backward()
        opt.step()
    return head.requires_grad_(False)


def scores(pred: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 and each class's recall (``None`` where the set has none of that class)."""
    recall = {c: (float((pred[labels == i] == i).float().mean()) if (labels == i).any() else None)
              for i, c in enumerate(LABELS)}
    return {"acc": float((pred == labels).float().mean()), "recall": recall}


def source_probe(feats: list[torch.Tensor], steps: int = 300, lr: float = 0.01) -> torch.nn.Linear:
    """A linear classifier of which source (index into ``feats``) a face's features come from, each
    source weighted alike; fit on standardised features, the standardisation folded into it."""
    x = torch.cat(feats)
    y = torch.cat([torch.full((len(f),), i) for i, f in enumerate(feats)])
    mean, std = x.mean(0), x.std(0) + 1e-3
    probe = torch.nn.Linear(x.shape[1], len(feats))
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    balance = len(y) / (len(feats) * torch.bincount(y).float())
    z = (x - mean) / std
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(probe(z), y, weight=balance).backward()
        opt.step()
    with torch.no_grad():  # w (x - mean) / std + b == (w / std) x + (b - (w / std) mean)
        probe.weight /= std
        probe.bias -= probe.weight @ mean
    return probe.requires_grad_(False)


def likeness(probe: torch.nn.Linear, feats: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict:
    """The share of a set's faces (all, and per class) the probe takes for each source."""
    looks = probe(feats).argmax(1)

    def shares(mask: torch.Tensor) -> dict[str, float]:
        return {n: float((looks[mask] == i).float().mean()) for i, n in enumerate(names)}
    return {"all": shares(torch.ones_like(labels, dtype=torch.bool)),
            "by_class": {c: shares(labels == i) for i, c in enumerate(LABELS) if (labels == i).any()}}


def _heads(parts: list[Part], names: list[str], own: torch.nn.Linear,
           shares: list[float]) -> dict[str, torch.nn.Linear]:
    heads = {"own head": own}
    for name, (f, t, _) in zip(names, parts):
        heads[f"{name} alone"] = fit_head([(f, t, 1.0)], own, adjust=False)
    rest = sum(w for _, _, w in parts[1:])
    for share in shares:
        weighted = [(parts[0][0], parts[0][1], 1.0 - share)] + [(f, t, share * w / rest) for f, t, w in parts[1:]]
        heads[f"joint, {share:g} not {names[0]}"] = fit_head(weighted, own)
    return heads


def _print(out: dict, names: list[str]) -> None:
    vals = list(out["likeness"])
    print("| head | " + " | ".join(f"{v} top-1 (happy / neutral)" for v in vals) + " |\n|---|" + "---|" * len(vals))
    for head, by_val in out["heads"].items():
        cells = [f"{s['acc']:.3f} ({s['recall']['happy'] or 0:.3f} / {s['recall']['neutral'] or 0:.3f})"
                 for s in by_val.values()]
        print(f"| {head} | " + " | ".join(cells) + " |")
    print("\n| set: faces that look like | " + " | ".join(names) + " | its neutral faces |\n|---|"
          + "---|" * (len(names) + 1))
    for v, lk in out["likeness"].items():
        neutral = lk["by_class"].get("neutral")
        tail = ", ".join(f"{n} {neutral[n]:.2f}" for n in names) if neutral else "-"
        print(f"| {v} | " + " | ".join(f"{lk['all'][n]:.2f}" for n in names) + f" | {tail} |")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="the checkpoint whose features and head are probed")
    p.add_argument("--source", action="append", required=True,
                   help="a training source (repeat; the first is the prior's reference)")
    p.add_argument("--val", action="append", required=True, help="a labelled set to score (source text; repeat)")
    p.add_argument("--share", default="0.2,0.4",
                   help="comma-separated shares of the sources after the first, one joint head each")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(args.weights).eval()
    spec = model.spec.to_dict()
    parts, names = [], []
    for text in args.source:
        src = Source.parse(text)
        ds = source_dataset(src, spec)
        parts.append((pooled_features(model, ds)[0], ds.target_rows(), src.weight))
        names.append(src.name)
    heads = _heads(parts, names, model.fc, [float(s) for s in args.share.split(",") if s.strip()])
    probe = source_probe([f for f, _, _ in parts])
    out = {"weights": args.weights, "sources": args.source, "heads": {h: {} for h in heads}, "likeness": {}}
    with torch.no_grad():
        for text in args.val:
            src = Source.parse(text)
            feats, labels = pooled_features(model, source_dataset(src, spec))
            for h, head in heads.items():
                out["heads"][h][src.name] = scores(head(feats).argmax(1), labels)
            out["likeness"][src.name] = likeness(probe, feats, labels, names)
    _print(out, names)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
