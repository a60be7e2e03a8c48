"""How do different sources label the faces that look like one set's faces of one class?

For each face of ``--query`` (e.g. the photos, detected as served) whose label is ``--class``, the
labels of its ``--k`` nearest faces in each ``--source`` (cosine similarity of a network's pooled
features, ``forward_features``), pooled over the query faces. Where two sources' shares disagree,
their annotators named the same-looking faces differently, and no single classifier can agree
with both (issue 33: the photos' neutral faces among AffectNet's and FER2013's training faces).

    .venv/bin/python tools/measure_neighbour_labels.py --weights pretrain/emotion_image.pth \\
        --query photos=../shared/data/photos,detect=auto --class neutral \\
        --source affectnet=../shared/data/affectnet/train,detect=auto --source fer2013=../shared/data/fer2013/train

Sources are ``training.sources`` text (``name=path[,detect=auto]...``). Prints a markdown table,
then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_defs import LABELS, load_model  # noqa: E402
from training.features import pooled_features  # noqa: E402
from training.sources import Source, source_dataset  # noqa: E402


def embed(model: torch.nn.Module, ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-length pooled features ``(N, F)`` and labels ``(N,)`` of ``ds``'s faces."""
    feats, labels = pooled_features(model, ds)
    return torch.nn.functional.normalize(feats, dim=1), labels


def neighbour_label_shares(query: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """``(K,)``: the share of each class among the ``k`` nearest ``feats`` of every ``query`` row, pooled."""
    nearest = (query @ feats.T).topk(min(k, len(feats)), dim=1).indices
    return torch.bincount(labels[nearest].flatten(), minlength=len(LABELS)).double() / nearest.numel()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="a checkpoint whose features measure likeness")
    p.add_argument("--query", required=True, help="the faces asked about (source text)")
    p.add_argument("--class", dest="cls", default="neutral", choices=LABELS, help="the query faces' label asked about")
    p.add_argument("--source", action="append", required=True, help="a labelled source to look in (repeat)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.weights).eval()
    spec = model.spec.to_dict()
    q_feats, q_labels = embed(model, source_dataset(Source.parse(args.query), spec))
    query = q_feats[q_labels == LABELS.index(args.cls)]
    out = {"weights": args.weights, "query": args.query, "class": args.cls, "faces": len(query), "k": args.k,
           "sources": {}}
    for text in args.source:
        src = Source.parse(text)
        feats, labels = embed(model, source_dataset(src, spec))
        prior = torch.bincount(labels, minlength=len(LABELS)).double() / len(labels)
        shares = neighbour_label_shares(query, feats, labels, args.k)
        out["sources"][src.name] = {"neighbours": dict(zip(LABELS, shares.tolist())),
                                    "source": dict(zip(LABELS, prior.tolist()))}
    print(f"{out['faces']} {args.cls} faces of {args.query}, {args.k} nearest in each source "
          f"(the source's own share in brackets):\n")
    print("| source | " + " | ".join(LABELS) + " |\n|---|" + "---|" * len(LABELS))
    for name, s in out["sources"].items():
        print(f"| {name} | " + " | ".join(f"{s['neighbours'][c]:.2f} ({s['source'][c]:.2f})" for c in LABELS) + " |")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
