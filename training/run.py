"""Train or fine-tune an emotion model.

    python -m training.run --task image --data ../shared/data/fer2013 --epochs 40
    torchrun --nproc-per-node 4 -m training.run --task image --data DIR ...   # DDP

``--data DIR`` holds ``train/`` and ``val/`` (or ``test/``) ImageFolder trees, or, with
``--train-list/--val-list``, images listed as ``relative/path label`` (RAF-DB style).
A checkpoint is written every epoch to ``--output-dir``; ``--resume`` continues from it.
The best epoch's weights go to ``<output-dir>/best.pth`` (the format ``export`` reads).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from model_defs import (DEFAULT_MODEL, adapt_input_channels, create_model, default_spec, list_models, load_checkpoint,
                        with_channels)

from .augment import AugmentConfig
from .datasets import ImageFolderDataset, cache_in_memory, random_subset
from .distill import mix_teacher_targets, read_targets, with_unlabelled
from .engine import FitConfig, fit, is_main, lp_embedding, prepare_batch, setup_distributed
from .sources import CLASS_SAMPLING, LoadOptions, Source, multi_source_loaders, source_dataset
from .video_task import video_datasets

log = logging.getLogger("training.run")

def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train an emotion recognition model", add_help=add_help)
    p.add_argument("--task", choices=["image", "video"], default="image")
    p.add_argument("--model", default=None, help=f"network name (default per task: {DEFAULT_MODEL})")
    p.add_argument("--data", required=False, help="dataset root (train/ and val/ folders, or list-file root)")
    p.add_argument("--train-dir", help="training folder (default DATA/train)")
    p.add_argument("--val-dir", help="validation folder (default DATA/val, else DATA/test)")
    p.add_argument("--train-list", help="list file 'relative/path label' (paths relative to --data)")
    p.add_argument("--val-list", help="list file for validation")
    p.add_argument("--source", action="append", metavar="NAME=PATH[,weight=W][,soft=CSV]",
                   help="a training source (repeat for several): class folders, a folder with labels.csv, or a list "
                        "file; weight = its share of the draws; soft = FER+ votes (label_weight=X); detect=auto = framed as served; "
                        "teacher = a training.distill folder mixed into the targets (teacher_weight=X); detail=N = faces shrunk "
                        "to N px across first; neutral=X = X of each emotion label moved to neutral (neutral_teacher=DIR: X times "
                        "that teacher's neutral probability per face); see training/sources.py")
    p.add_argument("--val-source", action="append", metavar="NAME=PATH",
                   help="a named validation set (repeat for several), scored every epoch")
    p.add_argument("--best-rule", default="mean",
                   help="with several --val-source: the best epoch maximises the mean (default) or min of their "
                        "top-1, or one named set's; recall floors may follow, e.g. 'mean,fer2013.neutral>=0.78': an "
                        "epoch that meets them is kept before one that does not")
    p.add_argument("--class-sampling", choices=sorted(CLASS_SAMPLING), default="none",
                   help="with --source: draw the classes of each source as they come (none), by the square root "
                        "of their counts (sqrt), or alike (balanced)")
    p.add_argument("--logit-adjust", type=float, default=0.0, metavar="TAU",
                   help="with --source: add TAU * log(source prior / reference prior) to each item's logits in the "
                        "loss, so the network keeps the reference source's class prior (0 = off); a prior is "
                        "the mean of the source's training targets as drawn")
    p.add_argument("--prior-ref", help="with --logit-adjust: the reference source (default: the first --source)")
    p.add_argument("--soft-labels", metavar="CSV",
                   help="FER+ votes (ferplus_votes.csv): train on a mix of the folder label and the vote distribution")
    p.add_argument("--label-weight", type=float, default=0.5,
                   help="with --soft-labels: weight of the folder label's one-hot in the target (the rest: FER+ votes)")
    p.add_argument("--distill", metavar="DIR",
                   help="teacher targets from python -m training.distill: mixed into the training images' "
                   "targets, and its unlabelled faces added to the training set")
    p.add_argument("--distill-weight", type=float, default=0.5,
                   help="with --distill: weight of the teacher's answer in a training image's target")
    p.add_argument("--pretrained", action="store_true",
                   help="start from ImageNet weights (networks that have them, e.g. emo_mobilenet_v2)")
    p.add_argument("--one-based", action="store_true", help="list-file labels are 1-7 (RAF-DB) not 0-6")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("-b", "--batch-size", type=int, default=64)
    p.add_argument("--opt", default="sgd", choices=["sgd", "adamw"])
    p.add_argument("--lr", type=float, default=0.05,
                   help="peak learning rate (the seed used 3e-5, a fine-tuning rate; see README)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=5e-4)
    p.add_argument("--sched", default="cosine", choices=["cosine", "onecycle", "none"])
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--class-balance", default="sqrt", choices=["none", "sqrt", "inverse"],
                   help="loss weights from class counts (disgust is rare in FER2013)")
    p.add_argument("--lp-loss", type=float, default=0.0,
                   help="weight of DLP-CNN's locality-preserving loss (0 = off; the paper uses ~0.003)")
    p.add_argument("--lp-k", type=int, default=5, help="neighbours for the LP loss")
    p.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0 = off)")
    p.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0 = off)")
    p.add_argument("--erase", type=float, default=0.25, help="random-erasing probability")
    p.add_argument("--rotate", type=float, default=15.0, help="max rotation in degrees")
    p.add_argument("--ema-epochs", type=float, default=0.0,
                   help="also evaluate a moving average of the weights with this time constant in epochs; "
                        "the better of it and the trained weights is kept as best (0 = off)")
    p.add_argument("--tta-flip", action="store_true", help="evaluate with mirror averaging")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="disable mixed precision on CUDA")
    p.add_argument("--cpu-bf16", action="store_true",
                   help="bfloat16 autocast on CPU (faster for dense networks on AMX processors; bench/bench_train.py)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="train in contiguous NCHW instead of channels_last")
    p.add_argument("--head-lr-scale", type=float, default=1.0,
                   help="learning rate of the classifier relative to the body (e.g. 10 for a pretrained body)")
    p.add_argument("--still-clips", help="video: synthesise training clips from this ImageFolder of face stills")
    p.add_argument("--detect-faces", action="store_true", help="video: detect and align the face in each frame")
    p.add_argument("--freeze", nargs="*", default=[], metavar="PREFIX",
                   help="freeze parameters whose names start with PREFIX (e.g. frame_cnn)")
    p.add_argument("--eval-initial", action="store_true",
                   help="score the starting weights as epoch 0, so the best kept can be the start")
    p.add_argument("--init", help="weights to start from (fine-tuning), e.g. pretrain/emotion_image.pth")
    p.add_argument("--input-size", type=int, default=0,
                   help="input side in pixels (0: the network's own); a fully convolutional network can "
                        "be fine-tuned at a larger size from --init weights")
    p.add_argument("--channels", type=int, choices=(1, 3), default=0,
                   help="input channels, 1 grey or 3 colour (0: the network's own); --init weights of the other "
                        "kind are adapted (a grey first layer spread over colour answers grey faces alike)")
    p.add_argument("--cache", action="store_true", help="decode the datasets into memory once")
    p.add_argument("-j", "--workers", type=int, default=2, help="data-loading processes")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--subset", type=int, default=0, help="use only N training images (smoke runs)")
    p.add_argument("--output-dir", default=None, help="checkpoints and TensorBoard logs (default runs/<task>)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pth")
    p.add_argument("--seed", type=int, default=0)
    return p


def data_sources(args: argparse.Namespace) -> tuple[list[Source], list[Source]]:
    """The training and validation sources: ``--source``/``--val-source``, or the single-source
    flags (``--data``, ``--train-dir``/``--val-dir``, ``--train-list``/``--val-list``, ``--soft-labels``)
    as one source each, named ``train`` and ``val``."""
    try:
        train = [Source.parse(t) for t in args.source or []]
        val = [Source.parse(t) for t in args.val_source or []]
    except ValueError as e:
        raise SystemExit(str(e)) from e
    root = Path(args.data) if args.data else None
    list_opts = {"root": root, "one_based": args.one_based}
    if not train:
        if args.train_list:
            if root is None:
                raise SystemExit("--train-list needs --data (the folder the listed paths are relative to)")
            train = [Source("train", Path(args.train_list), **list_opts)]
        elif args.train_dir or root is not None:
            train = [Source("train", Path(args.train_dir) if args.train_dir else root / "train")]
        if train and args.soft_labels:
            train = [dataclasses.replace(train[0], soft_labels=Path(args.soft_labels), label_weight=args.label_weight)]
    if not val:
        if args.val_list or args.train_list:
            val = [Source("val", Path(args.val_list or args.train_list), **list_opts)]
        elif args.val_dir or root is not None:
            val = [Source("val", Path(args.val_dir) if args.val_dir else next(
                (root / d for d in ("val", "test") if (root / d).is_dir()), root / "val"))]
    return train, val


def load_options(args: argparse.Namespace) -> LoadOptions:
    return LoadOptions(args.subset, args.seed, args.cache, args.workers)


def build_datasets(args: argparse.Namespace, spec: dict) -> tuple[Dataset, Dataset, list[int]]:
    """Single-source training and validation datasets (``--data``-style flags), and the class counts."""
    opts = load_options(args)
    train, val = data_sources(args)
    if args.task == "video":
        still = Path(args.still_clips) if args.still_clips else None
        return video_datasets(train[0] if train else None, val[0] if val else None, spec, opts, still,
                              args.detect_faces)
    if not train or not val:
        raise SystemExit("no training or validation data: give --data, --train-dir/--val-dir or --source/--val-source")
    tr, va = source_dataset(train[0], spec), source_dataset(val[0], spec)
    counts = tr.class_counts()
    faces = []
    if args.distill:
        if not isinstance(tr, ImageFolderDataset):
            raise SystemExit("--distill needs an ImageFolder training set (--data DIR with train/)")
        teacher, faces = read_targets(args.distill)
        n = mix_teacher_targets(tr, teacher, args.distill_weight)
        log.info("teacher targets for %d of %d training images, %d unlabelled faces added", n, len(tr), len(faces))
    if opts.subset:
        tr, counts = random_subset(tr, tr.labels, opts.subset, opts.seed)
    tr = with_unlabelled(tr, faces, spec)
    if opts.cache:
        tr, va = cache_in_memory(tr, opts.workers), cache_in_memory(va, opts.workers)
    return tr, va, counts


def build_loaders(args: argparse.Namespace, spec: dict, device: torch.device, rank: int,
                  world: int) -> tuple[DataLoader, DataLoader | dict[str, DataLoader], list[int], list[list[float]] | None]:
    """Training loader, validation loader(s) (a dict over ``--val-source``s), the training class
    counts, and the per-source logit offsets (``--logit-adjust``)."""
    workers = 0 if args.cache else args.workers
    pin = device.type == "cuda"
    if not (args.source or args.val_source):
        tr, va, counts = build_datasets(args, spec)
        sampler = DistributedSampler(tr, shuffle=True) if world > 1 else None
        if sampler is not None:
            sampler.set_epoch(1)
            log.info("rank %d/%d: epoch 1 shard of %d training items: %s", rank, world, len(sampler),
                     json.dumps(sorted(sampler)))
        train_loader = DataLoader(tr, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
                                  num_workers=workers, drop_last=True, pin_memory=pin, persistent_workers=workers > 0)
        return train_loader, DataLoader(va, batch_size=256, num_workers=workers), counts, None
    if args.task != "image" or args.distill:
        raise SystemExit("--source/--val-source are for --task image without --distill")
    train, val = data_sources(args)
    if not train or not val:
        raise SystemExit("--source and --val-source go together (give at least one of each)")
    try:
        loaders = multi_source_loaders(train, val, spec, load_options(args), args.batch_size, args.class_sampling,
                                       args.logit_adjust, args.prior_ref, args.best_rule, rank, world, pin)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    return loaders.train, loaders.val, loaders.class_counts, loaders.logit_adjust


BN_CALIBRATION_IMAGES = 512


def _calibration_batches(ds: Dataset, spec: dict, device: torch.device, seed: int) -> list[torch.Tensor]:
    """Normalized, unaugmented batches of random training images, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:BN_CALIBRATION_IMAGES].tolist()
    xs = torch.stack([ds[i][0] for i in idx])
    return [prepare_batch(b.to(device), spec) for b in xs.split(128)]


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rank, world, device = setup_distributed()
    name = args.model or DEFAULT_MODEL[args.task]
    if name not in list_models(args.task):
        raise SystemExit(f"unknown {args.task} model {name!r}; choose from {list_models(args.task)}")
    spec = default_spec(name)
    if args.input_size:
        spec = dataclasses.replace(spec, input_size=args.input_size)
    if args.channels:
        spec = with_channels(spec, args.channels)
    model = create_model(name, spec, **({"pretrained": True} if args.pretrained else {}))
    if args.init:
        init = load_checkpoint(args.init)
        if args.task == "video" and init["spec"].get("task") == "image":
            model.load_frame_weights(init)  # the frame CNN starts from image weights
            log.info("frame CNN initialised from image weights %s", args.init)
        else:
            state = adapt_input_channels(init["state_dict"], model)  # a grey start for a colour network
            log.info("initialised from %s (%s)", args.init, model.load_state_dict(state, strict=False))
    if args.lp_loss > 0:
        try:
            lp_embedding(model)
        except ValueError as e:
            raise SystemExit(f"--lp-loss {args.lp_loss}: {e}") from e
    frozen = [n for n, p in model.named_parameters() if any(n.startswith(f) for f in args.freeze)]
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    if args.freeze:
        log.info("froze %d parameter tensors (%s)", len(frozen), ", ".join(args.freeze))
    model.to(device)
    spec = model.spec.to_dict()
    train_loader, val_loader, counts, adjust = build_loaders(args, spec, device, rank, world)
    train_ds = train_loader.dataset
    if getattr(model, "batchnorm_from_data", False) and not (args.init or args.resume):
        model.calibrate_batchnorm(_calibration_batches(train_ds, spec, device, args.seed))
        log.info("batch norm statistics taken from %d training images", BN_CALIBRATION_IMAGES)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    aug = AugmentConfig(rotate=args.rotate, erase=args.erase, mixup=args.mixup, cutmix=args.cutmix)
    cfg = FitConfig(epochs=args.epochs, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                    optimizer=args.opt, scheduler=args.sched, warmup_epochs=args.warmup_epochs,
                    label_smoothing=args.label_smoothing, class_balance=args.class_balance,
                    lp_loss=args.lp_loss, lp_k=args.lp_k, tta_flip=args.tta_flip, amp=args.amp,
                    cpu_bf16=args.cpu_bf16, channels_last=args.channels_last, head_lr_scale=args.head_lr_scale,
                    ema_epochs=args.ema_epochs,
                    output_dir=args.output_dir or f"runs/{args.task}", resume=args.resume,
                    eval_initial=args.eval_initial, augment=aug, best_rule=args.best_rule, logit_adjust=adjust)
    vals = val_loader if isinstance(val_loader, dict) else {"val": val_loader}
    log.info("training %s on %d images (%s), validating on %s, %s x%d", name, len(train_ds), counts,
             ", ".join(f"{k} {len(v.dataset)}" for k, v in vals.items()), device, world)
    result = fit(model, train_loader, val_loader, cfg, device, counts,
                 extra_meta={"train_args": {k: v for k, v in vars(args).items() if v is not None}})
    if is_main():
        best = {k: result[k] for k in ("acc", "acc_top3", "best_epoch", "best_source", "per_class", "sources")
                if k in result}
        print(json.dumps(best))
        log.info("best weights: %s", Path(cfg.output_dir) / cfg.best_name)
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
