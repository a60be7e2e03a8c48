"""Calibrate an image model's probabilities on validation data: fit a temperature (and, with
``--class-bias``, a per-class offset; choose test-time mirror averaging; with ``--tta-scales``,
average over zoomed views), measure expected
calibration error, and write the weights with ``spec.extra["temperature"]`` (and ``class_bias``,
``tta_flip``, ``tta_scales``), which evaluation, the SDK and the exported TorchScript all apply
(``model_defs.inference_model``).

    python -m training.calibrate --weights runs/fer/best.pth --data ../shared/data/fer2013/val \
        --out pretrain/emotion_image.pth --reliability-png pretrain/reliability_image_fer2013_val.png
    python -m training.calibrate --weights runs/wild/best.pth --data ../shared/data/fer2013/val \
        ../shared/data/affectnet/val --out runs/wild/calibrated.pth      # the blended val

Every figure is also measured with the calibration fitted on one half of the data and scored on
the other (``*_2fold``): the class bias can move the top-1 answer, so its gain on the data it was
fitted on is not the gain on new faces.
"""
from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader

from model_defs import load_checkpoint, load_model, metadata, save_weights

from .datasets import image_dataset
from .engine import prepare_batch, predict_logits
from .metrics import ECE_BINS, calibration_bins, classification_metrics, reliability_figure

log = logging.getLogger("training.calibrate")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Calibrate an image model's probabilities (temperature scaling)",
                                add_help=add_help)
    p.add_argument("--weights", required=True)
    p.add_argument("--data", required=True, nargs="+",
                   help="validation ImageFolder tree(s); several are pooled (e.g. FER2013 val and AffectNet val: "
                        "the blended val a multi-source model is calibrated on)")
    p.add_argument("--out", required=True, help="where to write the weights with the calibrated spec")
    p.add_argument("--tta-flip", choices=("off", "on", "auto"), default="off",
                   help="mirror averaging at test time (spec extra.tta_flip; export compiles it in, "
                        "at twice the compute): off, on, or auto = keep it if it scores higher")
    p.add_argument("--tta-scales", type=float, nargs="+", default=None, metavar="SCALE",
                   help="average the answers over the face zoomed by each of these factors, e.g. 0.9 1.0 1.1 "
                        "(spec extra.tta_scales; export compiles it in, at that many times the compute); "
                        "default: keep the weights' own (none = 1.0)")
    p.add_argument("--class-bias", action="store_true",
                   help="also fit a per-class offset (bias-corrected temperature scaling): moves the class "
                        "priors of the training targets to those of --data's labels; can change the top-1 answer")
    p.add_argument("--reliability-png", help="save the reliability diagram (before/after) here")
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    return p


@torch.no_grad()  # not inference_mode: the logits feed the temperature fit's autograd
def collect_logits(model: nn.Module, loader: DataLoader, tta_flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Uncalibrated logits (temperature 1) and labels over a loader."""
    model.eval()
    model.spec.extra.pop("temperature", None)
    model.spec.extra.pop("class_bias", None)
    spec = model.spec.to_dict()
    out, labels = [], []
    for x, y in loader:
        out.append(predict_logits(model, prepare_batch(x, spec), tta_flip).float())
        labels.append(torch.as_tensor(y))
    return torch.cat(out), torch.cat(labels)


def fit_calibration(logits: torch.Tensor, labels: torch.Tensor, class_bias: bool = False) -> tuple[float, torch.Tensor]:
    """The temperature (and, with ``class_bias``, the per-class offset added after it) that
    minimises the negative log-likelihood of ``labels``. The offset is zero without ``class_bias``."""
    log_t = torch.zeros(1, requires_grad=True)
    bias = torch.zeros(logits.shape[1], requires_grad=class_bias)
    opt = torch.optim.LBFGS([log_t, bias] if class_bias else [log_t], lr=0.1, max_iter=200,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp() + bias, labels)
        loss.backward()
        return loss

    opt.step(closure)
    bias = bias.detach()
    return float(log_t.detach().exp()), bias - bias.mean()  # a common offset changes nothing


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature that minimises the negative log-likelihood of ``labels``."""
    return fit_calibration(logits, labels)[0]


def crossval(logits: torch.Tensor, labels: torch.Tensor, class_bias: bool = False, folds: int = 2,
             seed: int = 0) -> dict[str, float]:
    """ECE, top-1 and top-3 of a calibration fitted on the other folds: honest estimates on unseen data."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    parts, sums = perm.chunk(folds), {"ece": 0.0, "acc": 0.0, "acc_top3": 0.0}
    classes = [str(k) for k in range(logits.shape[1])]
    for i, held in enumerate(parts):
        fit_idx = torch.cat([p for j, p in enumerate(parts) if j != i])
        t, bias = fit_calibration(logits[fit_idx], labels[fit_idx], class_bias)
        scores = classification_metrics((logits[held] / t + bias).softmax(-1), labels[held], classes)
        for k in sums:
            sums[k] += scores[k] * len(held)
    return {k: v / len(labels) for k, v in sums.items()}


def _summary(logits: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict[str, Any]:
    return {**classification_metrics(logits.softmax(-1), labels, names), "nll": float(F.cross_entropy(logits, labels))}


def _set_scales(model: nn.Module, scales: list[float] | None) -> None:
    """Store the test-time zoom factors in the spec (none when only 1.0); ``None`` keeps the weights' own."""
    if scales is None:
        return
    if any(not s > 0 for s in scales):
        raise SystemExit(f"--tta-scales must be positive, got {scales}")
    model.spec.extra.pop("tta_scales", None)
    if [float(s) for s in scales] != [1.0]:
        model.spec.extra["tta_scales"] = [float(s) for s in scales]


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.weights)
    _set_scales(model, args.tta_scales)
    data = ConcatDataset([image_dataset(d, model.spec.to_dict()) for d in args.data])
    loader = DataLoader(data, batch_size=256, num_workers=args.workers)
    where = " + ".join(args.data)
    flips = {"off": (False,), "on": (True,), "auto": (False, True)}[args.tta_flip]
    scored = {flip: collect_logits(model, loader, flip) for flip in flips}
    held_out_by_flip = {f: crossval(lg, lb, args.class_bias) for f, (lg, lb) in scored.items()}
    acc_by_flip = {f: h["acc"] for f, h in held_out_by_flip.items()}  # chosen on the held-out top-1
    flip = max(flips, key=acc_by_flip.__getitem__)
    logits, labels = scored[flip]
    held_out = held_out_by_flip[flip]
    t, bias = fit_calibration(logits, labels, args.class_bias)
    names = list(model.spec.labels)
    before, after = _summary(logits, labels, names), _summary(logits / t + bias, labels, names)
    report = {"data": where, "tta_flip": flip,
              "tta_scales": model.spec.extra.get("tta_scales", [1.0]), "temperature": t, "class_bias": bias.tolist(),
              "ece_bins": ECE_BINS, "ece_before": before["ece"], "ece_after": after["ece"],
              "ece_after_2fold": held_out["ece"], "nll_before": before["nll"], "nll_after": after["nll"],
              "acc_before": before["acc"], "acc": after["acc"], "acc_top3": after["acc_top3"],
              "acc_2fold": held_out["acc"], "acc_top3_2fold": held_out["acc_top3"],
              "acc_by_tta_flip": {str(f): acc for f, acc in acc_by_flip.items()}}
    log.info("temperature %.3f: ECE %.4f -> %.4f (2-fold %.4f), NLL %.4f -> %.4f, top-1 %.4f -> %.4f (2-fold %.4f)",
             t, report["ece_before"], report["ece_after"], report["ece_after_2fold"], report["nll_before"],
             report["nll_after"], report["acc_before"], report["acc"], report["acc_2fold"])
    model.spec.extra.pop("tta_flip", None)
    model.spec.extra.pop("input_blur", None)  # the old weights' low-pass: obsolete with sharp training data
    model.spec.extra["temperature"] = t
    model.spec.extra.pop("class_bias", None)
    if args.class_bias:
        model.spec.extra["class_bias"] = bias.tolist()
    if flip:
        model.spec.extra["tta_flip"] = True
    meta = metadata(load_checkpoint(args.weights))
    meta["calibration"] = report
    meta["metrics"] = {k: after[k] for k in ("acc", "acc_top3", "n", "per_class", "confusion")}
    save_weights(model, args.out, **meta)
    if args.reliability_png:
        title = (f"{model.spec.arch} on {where}: ECE {report['ece_before']:.3f} -> "
                 f"{report['ece_after']:.3f} (T={t:.2f})")
        bins = [calibration_bins(lg.softmax(-1), labels) for lg in (logits, logits / t + bias)]
        reliability_figure(*bins, title).savefig(args.reliability_png, dpi=100)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
