"""Calibrate an image model's probabilities on validation data: fit a temperature (and choose
test-time mirror averaging), measure expected calibration error, and write the weights with
``spec.extra["temperature"]`` (and ``tta_flip``), which evaluation, the SDK and the exported
TorchScript all apply (``model_defs.inference_model``).

    python -m training.calibrate --weights runs/fer/best.pth --data ../shared/data/fer2013/val \
        --out pretrain/emotion_image.pth --reliability-png pretrain/reliability_image_fer2013_val.png
"""
from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from model_defs import load_checkpoint, load_model, metadata, save_weights

from .datasets import image_dataset
from .engine import prepare_batch, predict_logits
from .metrics import (ECE_BINS, calibration_bins, classification_metrics, expected_calibration_error,
                      reliability_figure)

log = logging.getLogger("training.calibrate")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Calibrate an image model's probabilities (temperature scaling)",
                                add_help=add_help)
    p.add_argument("--weights", required=True)
    p.add_argument("--data", required=True, help="validation ImageFolder tree")
    p.add_argument("--out", required=True, help="where to write the weights with the calibrated spec")
    p.add_argument("--tta-flip", choices=("off", "on", "auto"), default="off",
                   help="mirror averaging at test time (spec extra.tta_flip; export compiles it in, "
                        "at twice the compute): off, on, or auto = keep it if it scores higher")
    p.add_argument("--reliability-png", help="save the reliability diagram (before/after) here")
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    return p


@torch.no_grad()  # not inference_mode: the logits feed the temperature fit's autograd
def collect_logits(model: nn.Module, loader: DataLoader, tta_flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Uncalibrated logits (temperature 1) and labels over a loader."""
    model.eval()
    model.spec.extra.pop("temperature", None)
    spec = model.spec.to_dict()
    out, labels = [], []
    for x, y in loader:
        out.append(predict_logits(model, prepare_batch(x, spec), tta_flip).float())
        labels.append(torch.as_tensor(y))
    return torch.cat(out), torch.cat(labels)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature that minimises the negative log-likelihood of ``labels``."""
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def crossval_ece(logits: torch.Tensor, labels: torch.Tensor, folds: int = 2, seed: int = 0) -> float:
    """ECE of a temperature fitted on the other folds: an honest estimate on unseen data."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    parts, errors = perm.chunk(folds), []
    for i, held in enumerate(parts):
        fit_idx = torch.cat([p for j, p in enumerate(parts) if j != i])
        t = fit_temperature(logits[fit_idx], labels[fit_idx])
        errors.append(expected_calibration_error((logits[held] / t).softmax(-1), labels[held]) * len(held))
    return sum(errors) / len(labels)


def _summary(logits: torch.Tensor, labels: torch.Tensor, t: float, names: list[str]) -> dict[str, Any]:
    return {**classification_metrics((logits / t).softmax(-1), labels, names),
            "nll": float(F.cross_entropy(logits / t, labels))}


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.weights)
    loader = DataLoader(image_dataset(args.data, model.spec.to_dict()), batch_size=256, num_workers=args.workers)
    flips = {"off": (False,), "on": (True,), "auto": (False, True)}[args.tta_flip]
    scored = {flip: collect_logits(model, loader, flip) for flip in flips}
    acc_by_flip = {f: float((lg.argmax(-1) == lb).float().mean()) for f, (lg, lb) in scored.items()}
    flip = max(flips, key=acc_by_flip.__getitem__)
    logits, labels = scored[flip]
    t = fit_temperature(logits, labels)
    names = list(model.spec.labels)
    before, after = _summary(logits, labels, 1.0, names), _summary(logits, labels, t, names)
    report = {"data": str(args.data), "tta_flip": flip, "temperature": t, "ece_bins": ECE_BINS,
              "ece_before": before["ece"], "ece_after": after["ece"], "ece_after_2fold": crossval_ece(logits, labels),
              "nll_before": before["nll"], "nll_after": after["nll"],
              "acc": after["acc"], "acc_top3": after["acc_top3"],
              "acc_by_tta_flip": {str(f): acc for f, acc in acc_by_flip.items()}}
    log.info("temperature %.3f: ECE %.4f -> %.4f (2-fold %.4f), NLL %.4f -> %.4f", t, report["ece_before"],
             report["ece_after"], report["ece_after_2fold"], report["nll_before"], report["nll_after"])
    model.spec.extra.pop("tta_flip", None)
    model.spec.extra.pop("input_blur", None)  # the old weights' low-pass: obsolete with sharp training data
    model.spec.extra["temperature"] = t
    if flip:
        model.spec.extra["tta_flip"] = True
    meta = metadata(load_checkpoint(args.weights))
    meta["calibration"] = report
    meta["metrics"] = {k: after[k] for k in ("acc", "acc_top3", "n", "per_class", "confusion")}
    save_weights(model, args.out, **meta)
    if args.reliability_png:
        title = (f"{model.spec.arch} on {args.data}: ECE {report['ece_before']:.3f} -> "
                 f"{report['ece_after']:.3f} (T={t:.2f})")
        bins = [calibration_bins((logits / temp).softmax(-1), labels) for temp in (1.0, t)]
        reliability_figure(*bins, title).savefig(args.reliability_png, dpi=100)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
