"""The one training/evaluation engine: used by ``training.run``, ``training.evaluate`` and the SDK."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from handlers.preprocess import LUMA_WEIGHTS, normalize
from model_defs import (atomic_save, atomic_write, checkpoint_dict, inference_model, load_checkpoint, save_weights,
                        unwrap)

from .augment import AugmentConfig, train_batch
from .ema import WeightAverage
from .losses import locality_preserving_loss, soft_cross_entropy, target_distribution
from .metrics import classification_metrics, confusion_figure
from .sources import best_score, meets_floors

log = logging.getLogger(__name__)


@dataclass
class FitConfig:
    """Everything that shapes a training run (saved in every checkpoint)."""

    epochs: int = 30
    lr: float = 3e-5
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"  # sgd | adamw
    scheduler: str = "cosine"  # cosine | onecycle | none
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    class_balance: str = "none"  # none | sqrt | inverse (loss weights from class counts)
    lp_loss: float = 0.0  # weight of the locality-preserving loss; 0 = off
    lp_k: int = 5
    tta_flip: bool = False  # average predictions over the image and its mirror at evaluation
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    cpu_bf16: bool = False  # bfloat16 autocast on CPU: faster for dense networks on AMX processors, slower for depthwise ones
    channels_last: bool = True  # NHWC memory format for 4-D image batches (1.6-1.8x faster CPU training, bench/bench_train.py)
    head_lr_scale: float = 1.0  # learning rate of the classifier (``fc``) relative to the body
    grad_clip: float = 0.0
    ema_epochs: float = 0.0  # time constant of a moving average of the weights, in epochs; 0 = off (training/ema.py)
    output_dir: str = "runs/image"
    best_name: str = "best.pth"
    resume: bool = False
    eval_initial: bool = False  # score the starting weights as "epoch 0" (fine-tuning must beat them)
    best_rule: str = "mean"  # several validation sets: mean | min | a set's name (training/sources.py)
    logit_adjust: list[list[float]] | None = None  # (sources, classes) offsets added to the logits in the loss
    augment: AugmentConfig = field(default_factory=AugmentConfig)


# ---------------------------------------------------------------- batches and metrics

def prepare_batch(x: torch.Tensor, spec: dict[str, Any], size: int | None = None) -> torch.Tensor:
    """uint8 batches (ours) are normalized here; float batches (a user's own loader) are taken
    as already normalized and only resized to the model's input size when they differ."""
    if x.dtype == torch.uint8:
        x = normalize(x, spec)
    size = size or int(spec["input_size"])
    if x.dim() == 4 and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if x.dim() == 4 and x.shape[1] != int(spec["channels"]):  # the luma of handlers.preprocess.to_grey
        luma = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) / 65536
        x = (x * luma).sum(1, keepdim=True) if int(spec["channels"]) == 1 else x.expand(-1, 3, -1, -1)
    return x


def predict_logits(model: nn.Module, x: torch.Tensor, tta_flip: bool | None = None) -> torch.Tensor:
    """Logits as served (``model_defs.inference_model``: the spec's mirror averaging and
    temperature); ``tta_flip`` overrides the spec's flag."""
    return inference_model(unwrap(model), tta_flip)(x)


@torch.inference_mode()
def evaluate_model(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu",
                   tta_flip: bool | None = None, progress: bool = False) -> dict[str, Any]:
    """Evaluate a classifier as served (the spec's mirror averaging and temperature): acc,
    acc_top3, n, per-class recall, confusion matrix, loss (NLL) and calibration error (ECE)."""
    model.eval()
    spec = unwrap(model).spec.to_dict()
    probs, labels, loss_sum = [], [], 0.0
    for x, y in tqdm(loader, desc="eval", disable=not progress, leave=False):
        x, y = prepare_batch(x.to(device), spec), torch.as_tensor(y).to(device)
        logits = predict_logits(model, x, tta_flip).float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        probs.append(logits.softmax(-1).cpu())
        labels.append(y.cpu())
    k = len(spec["labels"])
    out = classification_metrics(torch.cat(probs) if probs else torch.empty(0, k),
                                 torch.cat(labels) if labels else torch.empty(0, dtype=torch.long), spec["labels"])
    out["loss"] = loss_sum / max(out["n"], 1)
    return out


def evaluate_sources(model: nn.Module, loaders: Any, device: torch.device | str = "cpu",
                     tta_flip: bool | None = None, rule: str = "mean") -> dict[str, Any]:
    """:func:`evaluate_model` on one loader, or on a mapping ``name -> loader`` of validation sets:
    then ``acc``/``acc_top3`` are ``rule`` over the sets (``training.sources.best_score``), ``eligible``
    whether the rule's recall floors hold, ``sources`` holds each set's figures, and
    ``per_class``/``confusion`` are the first set's."""
    if not isinstance(loaders, Mapping):
        return evaluate_model(model, loaders, device, tta_flip)
    evs = {name: evaluate_model(model, loader, device, tta_flip) for name, loader in loaders.items()}
    first = next(iter(evs.values()))
    out = {k: first[k] for k in ("per_class", "confusion", "labels")}
    out.update(acc=best_score({k: e["acc"] for k, e in evs.items()}, rule),
               acc_top3=best_score({k: e["acc_top3"] for k, e in evs.items()}, rule),
               loss=sum(e["loss"] for e in evs.values()) / len(evs), n=sum(e["n"] for e in evs.values()),
               sources={k: {f: e[f] for f in SOURCE_FIELDS} for k, e in evs.items()},
               eligible=meets_floors({k: e["per_class"] for k, e in evs.items()}, rule))
    return out


SOURCE_FIELDS = ("acc", "acc_top3", "loss", "n", "ece", "per_class")
"""What is kept of each validation set's evaluation in the history and the best record."""


# ---------------------------------------------------------------- optimisation

def build_optimizer(model: nn.Module, cfg: FitConfig) -> torch.optim.Optimizer:
    """SGD or AdamW; no weight decay on norms and biases; the classifier ``fc`` at
    ``head_lr_scale`` times the learning rate."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in unwrap(model).named_parameters():
        if p.requires_grad:
            groups.setdefault((p.ndim > 1, name.startswith("fc.")), []).append(p)
    params = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0,
               "lr": cfg.lr * (cfg.head_lr_scale if head else 1.0)} for (decay, head), ps in sorted(groups.items())]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def build_scheduler(opt: torch.optim.Optimizer, cfg: FitConfig, steps_per_epoch: int):
    total, warm = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.25)
    if cfg.scheduler == "none":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def cosine(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, cosine)


def class_weights(counts: list[int], mode: str) -> torch.Tensor | None:
    """Loss weights from class counts (mean weight 1 over the present classes)."""
    if mode == "none" or not counts or not any(counts):
        return None
    c = torch.tensor(counts, dtype=torch.float32).clamp(min=1)
    w = c.rsqrt() if mode == "sqrt" else 1.0 / c
    return w * (len(c) / w.sum())


def lp_embedding(model: nn.Module) -> nn.Module:
    """The layer whose input is the embedding the locality-preserving loss pulls together: the
    classifier's dropout (``model.drop``) of the image networks. Raises ValueError for a network
    without one (the video hybrid fuses two heads: it has no single embedding)."""
    drop = getattr(unwrap(model), "drop", None)
    if not isinstance(drop, nn.Dropout):
        raise ValueError(f"the locality-preserving loss (--lp-loss) needs an image network with one embedding "
                         f"before its classifier; {unwrap(model).spec.arch!r} has none")
    return drop


def train_one_epoch(model: nn.Module, loader: Iterable, opt: torch.optim.Optimizer, sched, cfg: FitConfig,
                    device: torch.device, scaler: torch.amp.GradScaler, weights: torch.Tensor | None,
                    epoch: int, show: bool, ema: WeightAverage | None = None) -> dict[str, float]:
    """One pass over ``loader``; returns the mean loss and the learning rate at the end."""
    model.train()
    for m in model.modules():  # frozen layers keep their statistics too
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()
    spec = unwrap(model).spec.to_dict()
    total, count = 0.0, 0
    captured: list[torch.Tensor] = []
    hook = None
    if cfg.lp_loss > 0:
        hook = lp_embedding(model).register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not show, leave=False,
               mininterval=1 if sys.stderr.isatty() else 60)
    adjust = torch.tensor(cfg.logit_adjust, device=device) if cfg.logit_adjust else None
    for x, y, *source in bar:  # multi-source items carry their source's index
        x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)
        if x.dtype == torch.uint8:
            x, target = train_batch(x, y, spec, cfg.augment, len(spec["labels"]))
        else:
            x, target = prepare_batch(x, spec), target_distribution(y, len(spec["labels"]))
        if cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, cfg):
            logits = model(x)  # through the DDP wrapper, so gradients are synchronised
            if adjust is not None and source:
                logits = logits + adjust[torch.as_tensor(source[0], device=device)]
            loss = soft_cross_entropy(logits, target, cfg.label_smoothing, weights)
            if captured:
                labels = y.argmax(-1) if y.dim() == 2 else y
                loss = loss + cfg.lp_loss * locality_preserving_loss(captured.pop(), labels, cfg.lp_k)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        sched.step()
        if ema is not None:
            ema.step(model)
        total, count = total + loss.item() * len(y), count + len(y)
        bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
    if hook is not None:
        hook.remove()
    return {"loss": total / max(count, 1), "lr": opt.param_groups[0]["lr"]}


def autocast(device: torch.device, cfg: FitConfig) -> torch.autocast:
    """float16 mixed precision on CUDA (``cfg.amp``), bfloat16 on CPU (``cfg.cpu_bf16``)."""
    if device.type == "cuda":
        return torch.autocast("cuda", enabled=cfg.amp)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.cpu_bf16)


# ---------------------------------------------------------------- the loop

def is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def fit(model: nn.Module, train_loader, val_loader, cfg: FitConfig, device: torch.device | str = "cpu",
        class_counts: list[int] | None = None, extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train, evaluating after every epoch; keep the best epoch's weights; checkpoint every epoch.

    ``model`` may be DDP-wrapped. With ``cfg.ema_epochs`` the moving average of the weights is
    evaluated too, and the better of the two is the epoch's candidate for ``best``. Returns the best
    epoch's metrics with ``best_epoch`` (and ``best_source``: ``model`` or ``ema``).
    """
    device = torch.device(device)
    if cfg.channels_last and all(p.dim() != 5 for p in model.parameters()):  # not for 3-D convolutions
        model.to(memory_format=torch.channels_last)  # inputs follow in train_one_epoch
    out = Path(cfg.output_dir)
    ckpt_path = out / "checkpoint.pth"
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, len(train_loader))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")
    ema = WeightAverage(model, cfg.ema_epochs, len(train_loader)) if cfg.ema_epochs > 0 else None
    weights = class_weights(class_counts or [], cfg.class_balance)
    weights = weights.to(device) if weights is not None else None
    start, best, history = 1, {"acc": -1.0, "best_epoch": 0, "eligible": False}, []
    if cfg.resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location=device)
        unwrap(model).load_state_dict(state["state_dict"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        start, best, history = state["epoch"] + 1, state["best"], state["history"]
        log.info("resumed from %s at epoch %d (best acc %.4f at epoch %d)", ckpt_path, start,
                 best["acc"], best["best_epoch"])
    writer = _writer(out) if is_main() else None
    if cfg.eval_initial and start == 1 and is_main():
        ev = evaluate_sources(model, val_loader, device, cfg.tta_flip, cfg.best_rule)
        best = _keep_best(model, ev, 0, "model", out / cfg.best_name, extra_meta)
        history.append({"epoch": 0, "acc": ev["acc"], "acc_top3": ev["acc_top3"], "val_loss": ev["loss"],
                        **_per_source(ev)})
        log.info("epoch 0 (initial weights): val acc %.4f top3 %.4f%s", ev["acc"], ev["acc_top3"], _source_text(ev))
    for epoch in range(start, cfg.epochs + 1):
        if hasattr(getattr(train_loader, "sampler", None), "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        t0 = time.time()
        tr = train_one_epoch(model, train_loader, opt, sched, cfg, device, scaler, weights, epoch, is_main(), ema)
        ev = evaluate_sources(model, val_loader, device, cfg.tta_flip, cfg.best_rule)
        row = {"epoch": epoch, "train_loss": tr["loss"], "lr": tr["lr"], "val_loss": ev["loss"],
               "acc": ev["acc"], "acc_top3": ev["acc_top3"], **_per_source(ev),
               **({"eligible": ev["eligible"]} if "eligible" in ev else {})}
        candidates = [("model", model, ev)]
        if ema is not None:
            ev_ema = evaluate_sources(ema.model, val_loader, device, cfg.tta_flip, cfg.best_rule)
            row.update(ema_acc=ev_ema["acc"], ema_acc_top3=ev_ema["acc_top3"], ema_val_loss=ev_ema["loss"],
                       **_per_source(ev_ema, "ema_"))
            candidates.append(("ema", ema.model, ev_ema))
        row["seconds"] = time.time() - t0
        history.append(row)
        if is_main():
            source, winner, ev_best = max(candidates, key=lambda c: _rank(c[2]))
            if _rank(ev_best) > _rank(best):
                best = _keep_best(winner, ev_best, epoch, source, out / cfg.best_name, extra_meta)
            atomic_save(checkpoint_dict(model, optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                                        scaler=scaler.state_dict(), epoch=epoch, best=best, history=history,
                                        config=_plain(asdict(cfg)),
                                        **({"ema": ema.state_dict()} if ema is not None else {})), ckpt_path)
            atomic_write(out / HISTORY_JSON, lambda f: f.write(json.dumps(history, indent=1).encode()))
            _log_epoch(writer, row, ev)
            log.info("epoch %d/%d loss %.4f val acc %.4f top3 %.4f%s%s (best %.4f @%d) %.0fs", epoch, cfg.epochs,
                     tr["loss"], ev["acc"], ev["acc_top3"], _source_text(ev),
                     f" ema {row['ema_acc']:.4f} top3 {row['ema_acc_top3']:.4f}" if ema is not None else "",
                     best["acc"], best["best_epoch"], row["seconds"])
    if writer:
        writer.close()
    return {"acc": best["acc"], "acc_top3": best.get("acc_top3"), "best_epoch": best["best_epoch"],
            "best_source": best.get("source", "model"), "per_class": best.get("per_class"), "history": history,
            **({"sources": best["sources"]} if "sources" in best else {})}


def _rank(ev: dict[str, Any]) -> tuple[bool, float]:
    """What the best epoch maximises: first whether the best rule's recall floors hold, then its score."""
    return bool(ev.get("eligible", True)), float(ev["acc"])


def _keep_best(model: nn.Module, ev: dict[str, Any], epoch: int, source: str, path: Path,
               extra_meta: dict[str, Any] | None) -> dict[str, Any]:
    """Save ``model`` as the run's best weights; returns the ``best`` record kept in checkpoints."""
    best = {k: ev[k] for k in ("acc", "acc_top3", "n", "per_class", "confusion", "sources", "eligible") if k in ev}
    best.update(best_epoch=epoch, source=source)
    save_weights(model, path, metrics=best, **(extra_meta or {}))
    return best


HISTORY_JSON = "history.json"
"""The run's per-epoch figures (per validation source too), rewritten after every epoch."""


def _per_source(ev: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A history row's per-source figures (none for a single validation set)."""
    if "sources" not in ev:
        return {}
    return {f"{prefix}sources": {k: {f: v[f] for f in ("acc", "acc_top3", "loss")} for k, v in ev["sources"].items()}}


def _source_text(ev: dict[str, Any]) -> str:
    return "".join(f" {k} {v['acc']:.4f}" for k, v in ev.get("sources", {}).items())


def _plain(d: Any) -> Any:
    """Config as plain data (checkpoints are loaded with weights_only=True)."""
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_plain(v) for v in d]
    return d


def _writer(out: Path):
    return SummaryWriter(str(out / "tb"))


def _log_epoch(writer, row: dict[str, Any], ev: dict[str, Any]) -> None:
    if writer is None:
        return
    e = row["epoch"]
    for k in ("train_loss", "val_loss", "acc", "acc_top3", "lr", "ema_acc", "ema_acc_top3"):
        if k in row:
            writer.add_scalar(k.replace("_", "/", 1) if k.endswith("loss") else k, row[k], e)
    for name, figures in row.get("sources", {}).items():
        writer.add_scalar(f"acc/{name}", figures["acc"], e)
        writer.add_scalar(f"acc_top3/{name}", figures["acc_top3"], e)
    writer.add_figure("confusion_matrix", confusion_figure(ev["confusion"], ev["labels"]), e)
    writer.flush()


def setup_distributed() -> tuple[int, int, torch.device]:
    """Initialise DDP when launched by torchrun; returns (rank, world_size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if dist.is_initialized() else 0), world, device
