"""Choose the input low-pass (``spec.extra.input_blur``) that makes sharp inputs look like the
training data, and optionally test-time mirror averaging (``spec.extra.tta_flip``), on a
validation folder, and write the weights with them.

    python -m training.calibrate --weights runs/fer/best.pth --data ../shared/data/fer2013/val \
        --out pretrain/emotion_image.pth

Why: the FER2013 training split here is much blurrier than its validation split and than real
photos (mean horizontal gradient 3.9 vs 13.9 grey levels, see pretrain/MODEL_CARD.md); a model
trained on it does better when its inputs are low-passed the same way. The choice is made on
validation data only, like any other model selection, and travels in the spec, so serving,
evaluation and the SDK all apply it (``handlers.preprocess.to_uint8``).
"""
from __future__ import annotations

import argparse
import json
import logging

import torch
from torch.utils.data import DataLoader

from model_defs import load_checkpoint, load_model, save_weights

from .datasets import image_dataset
from .engine import evaluate

log = logging.getLogger("training.calibrate")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Calibrate the input low-pass of an image model", add_help=add_help)
    p.add_argument("--weights", required=True)
    p.add_argument("--data", required=True, help="validation ImageFolder tree")
    p.add_argument("--out", required=True, help="where to write the weights with the chosen spec")
    p.add_argument("--sigmas", default="0,1.5,2,2.5,3,3.5", help="Gaussian sigmas to try (model pixels)")
    p.add_argument("--tta-flip", choices=("off", "on", "auto"), default="off",
                   help="mirror averaging at test time (spec extra.tta_flip; export compiles it in, "
                        "at twice the compute): off, on, or auto = keep it if it scores higher")
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    return p


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.weights)
    flips = {"off": (False,), "on": (True,), "auto": (False, True)}[args.tta_flip]
    results: dict[tuple[float, bool], dict] = {}
    for sigma in map(float, args.sigmas.split(",")):
        model.spec.extra["input_blur"] = sigma
        ds = image_dataset(args.data, model.spec.to_dict())
        for flip in flips:
            res = evaluate(model, DataLoader(ds, batch_size=256, num_workers=args.workers), tta_flip=flip)
            results[(sigma, flip)] = res
            log.info("input_blur %.2f, tta_flip %s: acc %.4f top3 %.4f", sigma, flip, res["acc"], res["acc_top3"])
    best_sigma, best_flip = best = max(results, key=lambda k: results[k]["acc"])
    model.spec.extra["input_blur"] = best_sigma
    model.spec.extra.pop("tta_flip", None)
    if best_flip:
        model.spec.extra["tta_flip"] = True
    meta = {k: v for k, v in load_checkpoint(args.weights).items() if k not in ("state_dict", "spec", "format", "optimizer", "scheduler", "scaler")}
    meta["calibration"] = {"data": str(args.data), "input_blur": best_sigma, "tta_flip": best_flip,
                           "acc_by_sigma": {f"{s}{' flip' if f else ''}": r["acc"] for (s, f), r in results.items()}}
    meta["metrics"] = {k: results[best][k] for k in ("acc", "acc_top3", "n", "per_class", "confusion")}
    save_weights(model, args.out, **meta)
    out = {**meta["calibration"], "acc": results[best]["acc"], "acc_top3": results[best]["acc_top3"]}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
