"""Training and validation sources: each one small value that the dataset builder takes.

    --source fer2013=../shared/data/fer2013/train,weight=0.6,soft=../shared/data/fer2013/ferplus_votes.csv
    --source affectnet=../shared/data/affectnet/train,weight=0.4
    --val-source fer2013=../shared/data/fer2013/val --val-source affectnet=../shared/data/affectnet/val

A source is a class-folder tree, a folder with ``labels.csv`` (or the CSV itself), or a list file
(any other file: ``relative/path label`` lines). Several training sources are drawn from
in proportion to their ``weight`` (not their size), optionally class-balanced within each source
(``class_power``), and each source's class prior can be corrected in the loss (logit adjustment
toward a reference source's prior, so the served network keeps that prior). Several validation
sources are scored every epoch, and the best epoch is chosen by a stated rule over them.
"""
from __future__ import annotations

import bisect
import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from handlers.contract import DETECTION_MODES
from model_defs import LABELS

from .datasets import FaceCropFn, ListFileDataset, _EncodedImages, cache_in_memory, detected_face_crop, image_dataset
from .ferplus import read_votes, soft_targets
from .labelled_files import class_counts

log = logging.getLogger(__name__)

CLASS_SAMPLING = {"none": 0.0, "sqrt": 0.5, "balanced": 1.0}
"""Class sampling within a source: the power of a class's count by which its items are drawn less often."""
BEST_RULES = ("mean", "min")
"""Rules over the validation sources' top-1 for the best epoch; a source's name picks that source alone."""
_OPTIONS: dict[str, Callable[[str], Any]] = {"weight": float, "soft": Path, "label_weight": float, "root": Path,
                                            "one_based": lambda v: v.lower() in ("1", "true", "yes"),
                                            "detect": lambda v: one_of(v, DETECTION_MODES),
                                            "teacher": Path, "teacher_weight": float, "detail": int,
                                            "neutral": float, "neutral_teacher": Path}
_FIELDS = {"soft": "soft_labels"}
"""Option names that differ from the ``Source`` field they set."""


def one_of(value: str, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed``; ValueError naming them otherwise."""
    if value not in allowed:
        raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")
    return value


def parse_named(text: str, options: Mapping[str, Callable[[str], Any]]) -> tuple[str, Path, dict[str, Any]]:
    """``name=path[,key=value]...`` → name, path and the options, each converted by ``options[key]``.
    ValueError names what is wrong."""
    head, *rest = text.split(",")
    name, sep, path = head.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ValueError(f"{text!r}: expected name=path[,key=value]... (keys: {', '.join(options)})")
    out: dict[str, Any] = {}
    for opt in rest:
        key, sep, value = opt.partition("=")
        if not sep or key.strip() not in options:
            raise ValueError(f"{text!r}: unknown option {opt!r} (known: {', '.join(options)})")
        try:
            out[key.strip()] = options[key.strip()](value.strip())
        except ValueError as e:
            raise ValueError(f"{text!r}: bad value for {key.strip()}: {e}") from e
    return name.strip(), Path(path.strip()), out


@dataclass(frozen=True)
class Source:
    """One labelled source of faces."""

    name: str
    path: Path
    weight: float = 1.0
    """Share of the training draws (normalised over the training sources)."""
    soft_labels: Path | None = None
    """FER+ votes CSV (``ferplus_votes.csv``): targets mix the label and the vote distribution."""
    label_weight: float = 0.5
    """With ``soft_labels``: weight of the label's one-hot in the target."""
    root: Path | None = None
    """List files: the folder the listed paths are relative to (default: the list file's folder)."""
    one_based: bool = False
    """List files: labels 1-7 (RAF-DB) instead of 0-6."""
    detect: str = "never"
    """``auto``/``always``: each image goes through the served detection and alignment first (the
    crop a served photo gets: loose web crops framed as the network sees faces at serving)."""
    teacher: Path | None = None
    """A ``python -m training.distill --train-dir PATH`` output folder: its answers on this
    source's images are mixed into their targets (a teacher's view kept while learning the labels,
    e.g. the shipped model's, so that what it knew is not forgotten)."""
    teacher_weight: float = 0.3
    """With ``teacher``: the teacher's share of each target."""
    neutral: float = 0.0
    """Share of each non-neutral face's target moved to neutral: one source's emotion labels
    softened toward another's habit (AffectNet's annotators name an emotion where FER2013's and the
    photos' would often say neutral)."""
    neutral_teacher: Path | None = None
    """With ``neutral``: a ``python -m training.distill --train-dir PATH`` output folder; each face
    moves ``neutral`` times this teacher's neutral probability to neutral instead of ``neutral``
    alike, so the faces the teacher finds calm are softened and the clearly emotional ones keep
    their label."""
    detail: int = 0
    """Pixels across each face keeps (0 = all it has): the face (after detection) is shrunk to this
    width before the spec's resize, e.g. AffectNet's sharp 96 px faces at FER2013's 48 px, so that
    sharpness does not tell the network which source, and so which labelling habits, a face has."""

    @classmethod
    def parse(cls, text: str) -> "Source":
        """``name=path[,weight=W][,soft=CSV][,label_weight=X][,root=DIR][,one_based=1][,detect=auto]
        [,teacher=DIR][,teacher_weight=X][,detail=N][,neutral=X][,neutral_teacher=DIR]``."""
        name, path, options = parse_named(text, _OPTIONS)
        src = cls(name, path, **{_FIELDS.get(k, k): v for k, v in options.items()})
        if not (src.weight > 0 and math.isfinite(src.weight)):
            raise ValueError(f"source {src.name!r}: weight must be positive, got {src.weight}")
        if not 0.0 <= src.teacher_weight <= 1.0:
            raise ValueError(f"source {src.name!r}: teacher_weight must be in [0, 1], got {src.teacher_weight}")
        if not 0.0 <= src.neutral < 1.0:
            raise ValueError(f"source {src.name!r}: neutral must be in [0, 1), got {src.neutral}")
        if src.neutral_teacher and not src.neutral:
            raise ValueError(f"source {src.name!r}: neutral_teacher needs neutral=X "
                             "(the share at the teacher's certainty)")
        if src.detail < 0:
            raise ValueError(f"source {src.name!r}: detail must be 0 (all) or a width in pixels, got {src.detail}")
        return src

    def as_dict(self) -> dict[str, Any]:
        """Plain data (for checkpoints loaded with ``weights_only=True``)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def source_dataset(src: Source, spec: Mapping[str, Any], face_crop: FaceCropFn | None = None) -> _EncodedImages:
    """The images of one source, decoded through the one preprocessing contract (``spec``),
    with soft targets when the source has votes."""
    if face_crop is None and src.detect != "never":
        face_crop = detected_face_crop(spec, mode=src.detect)
    if src.detail:
        face_crop = with_detail(face_crop, src.detail)
    if src.path.is_file() and src.path.suffix.lower() != ".csv":
        ds: _EncodedImages = ListFileDataset(_image_root(src), src.path, spec, src.one_based, face_crop)
    else:
        ds = image_dataset(src.path, spec, face_crop)
    if src.soft_labels:
        ds.targets = soft_targets(ds.files, ds.labels, read_votes(src.soft_labels), src.label_weight)
    if src.teacher:
        _mix_teacher(ds, src)
    if src.neutral:
        share = src.neutral * _teacher_neutral(ds, src) if src.neutral_teacher else src.neutral
        ds.targets = toward_neutral(ds, share)
    return ds


def toward_neutral(ds: _EncodedImages, share: float | torch.Tensor) -> torch.Tensor:
    """``ds``'s targets (its labels one-hot if it has none) with ``share`` (one for all, or ``(N,)``
    one per face) of every non-neutral face's target moved to neutral; neutral faces keep theirs."""
    labels, targets = torch.as_tensor(ds.labels), ds.target_rows()
    share = torch.as_tensor(share, dtype=targets.dtype).expand(len(labels))
    moved = labels != LABELS.index("neutral")
    targets[moved] *= 1.0 - share[moved, None]
    targets[moved, LABELS.index("neutral")] += share[moved]
    return targets


def _teacher_neutral(ds: _EncodedImages, src: Source) -> torch.Tensor:
    """``(N,)``: ``src.neutral_teacher``'s neutral probability for each of ``ds``'s images (0 where it
    gave none); ValueError if it answered none of them."""
    from .distill import answers_for, read_targets  # distill imports the engine, which imports this

    found = answers_for(ds, read_targets(src.neutral_teacher)[0], _image_root(src))
    if all(p is None for p in found):
        raise _no_answers(src, src.neutral_teacher)
    n = LABELS.index("neutral")
    return torch.tensor([float(p[n]) if p is not None else 0.0 for p in found])


def with_detail(face_crop: FaceCropFn | None, width: int) -> FaceCropFn:
    """``face_crop`` (or the image itself) shrunk to at most ``width`` pixels across (box filter,
    aspect kept); the spec's resize then brings it to the network's input size."""
    def shrink(img: Image.Image) -> Image.Image:
        img = face_crop(img) if face_crop is not None else img
        if img.width <= width:
            return img
        return img.resize((width, max(1, round(img.height * width / img.width))), Image.BOX)
    return shrink


def _image_root(src: Source) -> Path:
    """The folder a source's image paths are relative to: a file's (a list file's ``root`` if
    given), else the source's folder."""
    return (src.root or src.path.parent) if src.path.is_file() else src.path


def _mix_teacher(ds: _EncodedImages, src: Source) -> None:
    """Mix ``src.teacher``'s answers into ``ds``'s targets; ValueError if it answered none of them."""
    from .distill import mix_teacher_targets, read_targets  # distill imports the engine, which imports this

    n = mix_teacher_targets(ds, read_targets(src.teacher)[0], src.teacher_weight, _image_root(src))
    if n == 0:
        raise _no_answers(src, src.teacher)
    log.info("source %s: teacher answers mixed into %d of %d targets (weight %.2f)", src.name, n, len(ds), src.teacher_weight)


def _no_answers(src: Source, folder: Path) -> ValueError:
    """The error for a teacher folder that answered none of ``src``'s images."""
    return ValueError(f"source {src.name!r}: {folder} has no answers for its images "
                      f"(python -m training.distill --train-dir {src.path})")


@dataclass(frozen=True)
class LoadOptions:
    """How a run loads its data (not what it loads)."""

    subset: int = 0
    """Use only this many training items per epoch (smoke runs; 0 = all)."""
    seed: int = 0
    cache: bool = False
    """Decode the datasets into memory once."""
    workers: int = 2
    """Data-loading processes."""


class MultiSourceDataset(Dataset):
    """Several sources as one: items are ``(uint8 image, (K,) target distribution, source index)``."""

    def __init__(self, datasets: Sequence[_EncodedImages], names: Sequence[str]) -> None:
        if len(datasets) != len(names) or not datasets:
            raise ValueError("one name per source dataset, at least one source")
        self.datasets, self.names = list(datasets), list(names)
        self.ends = [0]
        for ds in self.datasets:
            self.ends.append(self.ends[-1] + len(ds))
        self.labels = [c for ds in self.datasets for c in ds.labels]
        self.source_of = [s for s, ds in enumerate(self.datasets) for _ in range(len(ds))]

    def __len__(self) -> int:
        return self.ends[-1]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        s = bisect.bisect_right(self.ends, i) - 1
        x, y = self.datasets[s][i - self.ends[s]]
        if not isinstance(y, torch.Tensor) or y.dim() == 0:
            y = torch.nn.functional.one_hot(torch.as_tensor(y), len(LABELS)).float()
        return x, y, s

    def class_counts(self) -> list[int]:
        return class_counts(self.labels)

    def source_counts(self) -> list[list[int]]:
        """Per source, the class counts."""
        return [ds.class_counts() for ds in self.datasets]


def draw_weights(ds: MultiSourceDataset, source_weights: Sequence[float], class_power: float = 0.0) -> torch.Tensor:
    """Per-item draw probabilities: source ``s`` gets ``weight_s / sum(weights)`` of the draws;
    within it an item of class ``c`` is drawn in proportion to ``count_s(c) ** -class_power``
    (0: as the source has them, 1: every class alike)."""
    total = float(sum(source_weights))
    out = torch.empty(len(ds), dtype=torch.float64)
    for s, counts in enumerate(ds.source_counts()):
        per_class = [float(n) ** -class_power if n else 0.0 for n in counts]
        mass = sum(per_class[c] * counts[c] for c in range(len(counts)))
        for i in range(ds.ends[s], ds.ends[s + 1]):
            out[i] = source_weights[s] / total * per_class[ds.labels[i]] / mass
    return out


def sampled_priors(ds: MultiSourceDataset, class_power: float = 0.0) -> torch.Tensor:
    """``(S, K)``: the class prior of each source's draws: the mean of the targets the network is
    trained toward (soft targets, a teacher's share, labels softened toward neutral), each item
    drawn in proportion to its label's ``count ** -class_power``. With hard labels this is
    ``count ** (1 - class_power)``, normalised."""
    out = torch.zeros(len(ds.datasets), len(LABELS), dtype=torch.float64)
    for s, (sub, counts) in enumerate(zip(ds.datasets, ds.source_counts())):
        draw = torch.tensor(counts, dtype=torch.float64).clamp(min=1)[torch.as_tensor(sub.labels)] ** -class_power
        out[s] = (draw[:, None] * sub.target_rows().double()).sum(0)
    return out / out.sum(1, keepdim=True)


def logit_adjustment(ds: MultiSourceDataset, class_power: float, reference: int, tau: float = 1.0) -> torch.Tensor:
    """``(S, K)`` offsets added to the logits of source ``s``'s items in the loss:
    ``tau * (log p_s - log p_ref)``, ``p_s`` the prior of its draws and ``p_ref`` the reference
    source's own class prior, both the mean of the targets taught (``sampled_priors``). The network
    then learns the reference prior from every source (Menon et al., ICLR 2021, logit adjustment,
    here toward a chosen prior rather than a uniform one)."""
    floor = 0.5 / max(len(ds), 1)  # a class a source lacks: a finite, large offset
    p = sampled_priors(ds, class_power).clamp(min=floor)
    ref = sampled_priors(ds, 0.0)[reference].clamp(min=floor)
    return (tau * (p.log() - ref.log())).float()


class SourceSampler(Sampler[int]):
    """Draws ``num_samples`` item indices per epoch with replacement by ``weights``: the same draw on
    every rank (seeded by ``seed`` and the epoch), each rank taking its own share (DDP)."""

    def __init__(self, weights: torch.Tensor, num_samples: int, rank: int = 0, world: int = 1, seed: int = 0) -> None:
        self.weights, self.rank, self.world, self.seed = weights, rank, world, seed
        self.per_rank = max(1, num_samples // world)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        draw = torch.multinomial(self.weights, self.per_rank * self.world, replacement=True, generator=g)
        return iter(draw[self.rank::self.world].tolist())


def split_best_rule(rule: str) -> tuple[str, list[tuple[str, str, float]]]:
    """``"mean,fer2013.neutral>=0.75"`` → ``("mean", [("fer2013", "neutral", 0.75)])``: the rule over
    the sets' top-1, then any recall floors (``SET.CLASS>=RECALL``) an epoch must meet to be kept
    before one that does not. ValueError names a floor that does not parse."""
    base, *texts = [t.strip() for t in rule.split(",")]
    floors = []
    for text in texts:
        where, sep, value = text.partition(">=")
        name, dot, cls = where.rpartition(".")
        try:
            recall = float(value)
        except ValueError:
            recall = -1.0
        if not sep or not dot or not name or cls not in LABELS or not 0.0 <= recall <= 1.0:
            raise ValueError(f"best rule {rule!r}: {text!r} is not a recall floor SET.CLASS>=RECALL "
                             f"(a class of {', '.join(LABELS)}, a recall in [0, 1])")
        floors.append((name, cls, recall))
    return base, floors


def check_best_rule(rule: str, names: Sequence[str]) -> str:
    """``rule`` if its base is one of ``BEST_RULES`` or a validation source's name and its floors
    name validation sources; ValueError otherwise."""
    base, floors = split_best_rule(rule)
    if base not in BEST_RULES and base not in names:
        raise ValueError(f"best rule {rule!r}: choose {' or '.join(BEST_RULES)} or a validation source "
                         f"({', '.join(names)}), then any SET.CLASS>=RECALL floors")
    for name, _, _ in floors:
        if name not in names:
            raise ValueError(f"best rule {rule!r}: {name!r} is not a validation source ({', '.join(names)})")
    return rule


def best_score(scores: Mapping[str, float], rule: str) -> float:
    """The figure the best epoch maximises: the mean or the minimum over the validation
    sources, or one named source's (the rule's floors aside: ``meets_floors``)."""
    base = split_best_rule(rule)[0]
    if base == "mean":
        return sum(scores.values()) / len(scores)
    if base == "min":
        return min(scores.values())
    return scores[base]


def meets_floors(recalls: Mapping[str, Mapping[str, float]], rule: str) -> bool:
    """Whether every ``SET.CLASS>=RECALL`` floor of ``rule`` holds for ``recalls`` (per validation
    set, per class); an epoch that meets them is kept before any that does not, whatever its score."""
    return all(recalls[name][cls] >= recall for name, cls, recall in split_best_rule(rule)[1])


@dataclass
class SourceLoaders:
    """What a multi-source run trains and validates on."""

    train: DataLoader
    """Batches of ``(image, target distribution, source index)`` drawn by the sources' weights."""
    val: dict[str, DataLoader]
    """Per validation source, batches of ``(image, label)``."""
    class_counts: list[int]
    """Training images per class over all sources."""
    logit_adjust: list[list[float]] | None
    """Per source and class, the offset added to the logits in the loss (``FitConfig.logit_adjust``)."""


def multi_source_loaders(train: Sequence[Source], val: Sequence[Source], spec: Mapping[str, Any], opts: LoadOptions,
                         batch_size: int, class_sampling: str = "none", logit_adjust: float = 0.0,
                         prior_ref: str | None = None, best_rule: str = "mean", rank: int = 0, world: int = 1,
                         pin_memory: bool = False) -> SourceLoaders:
    """Loaders over several training sources (drawn by weight, optionally class-balanced within
    each) and several named validation sources. ValueError names a bad rule or reference source."""
    names = [s.name for s in train]
    if len(set(names)) != len(names) or len({s.name for s in val}) != len(val):
        raise ValueError("source names must be unique")
    check_best_rule(best_rule, [s.name for s in val])
    power = CLASS_SAMPLING[class_sampling]
    ds = MultiSourceDataset([source_dataset(s, spec) for s in train], names)
    for s, counts in zip(train, ds.source_counts()):
        log.info("source %s: %d images %s, weight %.3g", s.name, sum(counts), counts, s.weight)
    adjust = None
    if logit_adjust:
        ref = prior_ref or names[0]
        if ref not in names:
            raise ValueError(f"prior reference {ref!r} is not a training source ({', '.join(names)})")
        adjust = logit_adjustment(ds, power, names.index(ref), logit_adjust).tolist()
    sampler = SourceSampler(draw_weights(ds, [s.weight for s in train], power), opts.subset or len(ds), rank,
                            world, opts.seed)
    vals: dict[str, Dataset] = {s.name: source_dataset(s, spec) for s in val}
    tr: Dataset = ds
    if opts.cache:
        tr, vals = cache_in_memory(ds, opts.workers), {k: cache_in_memory(v, opts.workers) for k, v in vals.items()}
    workers = 0 if opts.cache else opts.workers
    train_loader = DataLoader(tr, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                              pin_memory=pin_memory, persistent_workers=workers > 0)
    val_loaders = {k: DataLoader(v, batch_size=256, num_workers=workers) for k, v in vals.items()}
    return SourceLoaders(train_loader, val_loaders, ds.class_counts(), adjust)
