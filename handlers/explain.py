"""Why this emotion: an attribution map per face crop, for TorchServe's explanations API.

Architecture-agnostic: every method sees the model only as a function from normalized face
crops ``(N, C, S, S)`` to logits (TorchScript or eager; any network, input size or channel
count the spec describes) and attributes the softmax probability of one label per crop:

* ``occlusion`` (forward passes only): each cell of a ``grid`` x ``grid`` partition of the crop
  is replaced by the baseline (the spec's mean grey, 0 once normalized) in a sliding window of
  ``window`` x ``window`` cells; a cell's score is the mean probability drop of the windows that
  cover it. Runs on the served CPU graph (``handlers/cpu_graph.py``).
* ``integrated_gradients`` (Sundararajan et al., 2017): the input minus the baseline times the
  mean gradient along ``steps`` points of the straight path from the baseline.
* ``gradient_x_input``: the input minus the baseline times the gradient (one backward pass).
* ``smoothgrad`` (Smilkov et al., 2017): gradient x input averaged over ``samples`` copies with
  Gaussian noise.

The gradient methods need a graph that gives gradients: a plain copy when the CPU graph is optimized. A map is the
attribution summed per cell over the cell's pixels and channels, its positive part (evidence
for the label), divided by its maximum: ``grid`` x ``grid`` floats in [0, 1], rows from the
top of the crop. Which method the handler uses was measured (``bench/bench_explain.py``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

try:  # inside the repository (package import)
    from . import faces, preprocess
    from .contract import BATCH_BUCKETS
except ImportError:  # inside a .mar the shared modules sit flat beside the handler
    import faces  # type: ignore[no-redef]
    import preprocess  # type: ignore[no-redef]
    from contract import BATCH_BUCKETS  # type: ignore[no-redef]

Model = Callable[[torch.Tensor], torch.Tensor]

METHODS: tuple[str, ...] = ("occlusion", "integrated_gradients", "gradient_x_input", "smoothgrad")
NEEDS_GRADIENTS = frozenset({"integrated_gradients", "gradient_x_input", "smoothgrad"})
DEFAULT_PARAMS: Mapping[str, Mapping[str, float]] = {
    "occlusion": {"window": 1},  # measured best (bench/bench_explain.py)
    "integrated_gradients": {"steps": 16},
    "gradient_x_input": {},
    "smoothgrad": {"samples": 16, "noise": 0.15},
}
MAX_CHUNK = BATCH_BUCKETS[-1]
"""Model inputs per forward pass while explaining: bounds the memory of one batch; at 1 thread (as
served: two workers of one thread) batches of 64 ran 1.6x faster per crop than 256 (bench_explain)."""


def check_method(method: str) -> None:
    """Raise ``ValueError`` for a method that does not exist."""
    if method not in METHODS:
        raise ValueError(f"explanation method must be one of {', '.join(METHODS)}, not {method!r}")


def target_probs(model: Model, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(N,)`` softmax probability of ``target[i]`` for each input, in chunks of MAX_CHUNK
    (``target`` is repeated when ``x`` holds several inputs per target)."""
    reps = x.shape[0] // max(1, target.shape[0])
    t = target.repeat_interleave(reps) if reps > 1 else target
    out = [torch.softmax(model(x[i:i + MAX_CHUNK]).float(), dim=1)
           .gather(1, t[i:i + MAX_CHUNK, None])[:, 0] for i in range(0, x.shape[0], MAX_CHUNK)]
    return torch.cat(out) if out else x.new_zeros(0)


def cell_bounds(size: int, grid: int) -> list[tuple[int, int]]:
    """Pixel ranges ``[start, end)`` of the ``grid`` cells along a side of ``size`` pixels."""
    edges = [round(i * size / grid) for i in range(grid + 1)]
    return [(edges[i], max(edges[i + 1], edges[i] + 1)) for i in range(grid)]


def pool_to_grid(attr: torch.Tensor, grid: int) -> torch.Tensor:
    """``(N, C, S, S)`` pixel attributions → ``(N, grid, grid)`` sums per cell (channels summed)."""
    a = attr.sum(1)
    bounds = cell_bounds(a.shape[-1], grid)
    rows = torch.stack([a[:, y0:y1].sum(1) for y0, y1 in bounds], dim=1)  # (N, grid, S)
    return torch.stack([rows[..., x0:x1].sum(-1) for x0, x1 in bounds], dim=2)


def to_map(cells: torch.Tensor) -> torch.Tensor:
    """Per-cell scores → the served map: positive part over its maximum, in [0, 1]."""
    pos = cells.clamp_min(0)
    peak = pos.flatten(1).amax(1).clamp_min(1e-12)
    return pos / peak[:, None, None]


def occlusion(model: Model, x: torch.Tensor, target: torch.Tensor, grid: int, window: int = 2) -> torch.Tensor:
    """Probability drop per cell, windows of ``window`` x ``window`` cells slid one cell at a time."""
    n, _, h, w = x.shape
    window = max(1, min(int(window), grid))
    bounds = cell_bounds(h, grid)
    starts = range(grid - window + 1)
    masks = torch.ones(len(starts) ** 2, 1, h, w, dtype=x.dtype, device=x.device)
    covered = torch.zeros(len(starts) ** 2, grid, grid, dtype=torch.float32)
    for k, (i, j) in enumerate((i, j) for i in starts for j in starts):
        masks[k, :, bounds[i][0]:bounds[i + window - 1][1], bounds[j][0]:bounds[j + window - 1][1]] = 0
        covered[k, i:i + window, j:j + window] = 1
    with torch.inference_mode():
        base = target_probs(model, x, target)  # (N,)
        occluded = (x[:, None] * masks[None]).flatten(0, 1)  # baseline 0: the spec's mean
        probs = target_probs(model, occluded, target).view(n, -1)  # (N, windows)
    drop = (base[:, None] - probs).cpu()
    weight = covered.flatten(1)  # (windows, cells)
    return ((drop @ weight) / weight.sum(0).clamp_min(1)).view(n, grid, grid)


def _input_gradient(model: Model, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d p(target) / d x for a batch (the graph must give gradients)."""
    with torch.enable_grad():  # clones: inputs made under inference_mode cannot enter autograd
        x = x.detach().clone().requires_grad_(True)
        p = target_probs(model, x, target.clone())
        (grad,) = torch.autograd.grad(p.sum(), x)
    return grad


def integrated_gradients(model: Model, x: torch.Tensor, target: torch.Tensor, grid: int,
                         steps: int = 16) -> torch.Tensor:
    """Integrated gradients from the mean-grey baseline (midpoint rule), summed per cell."""
    steps = max(1, int(steps))
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    path = (x[:, None] * alphas.view(1, -1, 1, 1, 1)).flatten(0, 1)
    grads = torch.cat([_input_gradient(model, path[i:i + MAX_CHUNK],
                                       target.repeat_interleave(steps)[i:i + MAX_CHUNK])
                       for i in range(0, path.shape[0], MAX_CHUNK)])
    attr = x * grads.view(x.shape[0], steps, *x.shape[1:]).mean(1)
    return pool_to_grid(attr.cpu(), grid)


def gradient_x_input(model: Model, x: torch.Tensor, target: torch.Tensor, grid: int) -> torch.Tensor:
    """(input - baseline) x gradient, summed per cell."""
    return pool_to_grid((x * _input_gradient(model, x, target)).cpu(), grid)


def smoothgrad(model: Model, x: torch.Tensor, target: torch.Tensor, grid: int, samples: int = 16,
               noise: float = 0.15, seed: int = 0) -> torch.Tensor:
    """Gradient x input averaged over ``samples`` noisy copies (noise: a fraction of the input's range)."""
    samples = max(1, int(samples))
    g = torch.Generator(device=x.device).manual_seed(seed)
    span = (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).view(-1, 1, 1, 1, 1)
    noisy = x[:, None] + noise * span * torch.randn((x.shape[0], samples, *x.shape[1:]), generator=g,
                                                     device=x.device, dtype=x.dtype)
    flat = noisy.flatten(0, 1)
    grads = torch.cat([_input_gradient(model, flat[i:i + MAX_CHUNK],
                                       target.repeat_interleave(samples)[i:i + MAX_CHUNK])
                       for i in range(0, flat.shape[0], MAX_CHUNK)])
    attr = (noisy * grads.view_as(noisy)).mean(1)
    return pool_to_grid(attr.cpu(), grid)


_METHODS: Mapping[str, Callable[..., torch.Tensor]] = {
    "occlusion": occlusion, "integrated_gradients": integrated_gradients,
    "gradient_x_input": gradient_x_input, "smoothgrad": smoothgrad}


def attribute(model: Model, x: torch.Tensor, target: torch.Tensor, method: str, grid: int,
              **params: Any) -> torch.Tensor:
    """``(N, grid, grid)`` maps in [0, 1] for normalized crops ``x`` and label indices ``target``."""
    check_method(method)
    if x.shape[0] == 0:
        return torch.zeros(0, grid, grid)
    return to_map(_METHODS[method](model, x, target, grid, **{**DEFAULT_PARAMS[method], **params}))


# --- where a crop sits in the photo ----------------------------------------------------------
def crop_corners(face: faces.Face | None, box: Sequence[float], size: int,
                 margin: float | None) -> list[list[float]]:
    """The model crop's corners in the picture's pixels: top-left, top-right, bottom-right,
    bottom-left (the map's rows run from the first two to the last two). An aligned face's crop
    (``face``) is rotated and scaled as ``faces.align_face`` cuts it (``size``, ``margin``); a
    picture classified whole (``face`` None) is its ``box``, ``[0, 0, width, height]``."""
    if face is None:
        x0, y0, x1, y1 = (float(v) for v in box)
        pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)
    else:
        m, t = faces.similarity_transform(face.landmarks,
                                          faces.template_points(size, margin, detector=face.detector))
        square = np.array([[0, 0], [size, 0], [size, size], [0, size]], np.float64)
        pts = (square - t) @ np.linalg.inv(m).T
    return [[round(float(x), 1), round(float(y), 1)] for x, y in pts]


def map_to_pixels(cell_map: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, G, G)`` map → ``(N, size, size)``, each pixel its cell's value (the cells of
    :func:`cell_bounds`)."""
    grid = cell_map.shape[-1]
    idx = torch.tensor([k for k, (a, b) in enumerate(cell_bounds(size, grid)) for _ in range(a, b)][:size])
    return cell_map[:, idx][:, :, idx]


def upsample(cell_map: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, G, G)`` map → ``(N, size, size)``, smooth (bilinear), for drawing."""
    return F.interpolate(cell_map[:, None].float(), size=(size, size), mode="bilinear",
                         align_corners=False)[:, 0].clamp(0, 1)


def rounded(cell_map: torch.Tensor, digits: int = 3) -> list[list[float]]:
    """One ``(G, G)`` map as JSON rows."""
    return [[round(float(v), digits) for v in row] for row in cell_map]


def deletion_drop(model: Model, x: torch.Tensor, target: torch.Tensor, cell_maps: torch.Tensor,
                  fraction: float = 0.1, seed: int = 0) -> torch.Tensor:
    """Faithfulness: the drop of ``p(target)`` when the ``fraction`` of each crop's pixels its
    map rates highest are set to the baseline (mean grey); ties are broken at random, so a
    constant map deletes random pixels. Returns ``(N,)`` drops."""
    n, c, h, w = x.shape
    g = torch.Generator().manual_seed(seed)
    per_pixel = map_to_pixels(cell_maps.float(), h).flatten(1)
    jitter = torch.rand(per_pixel.shape, generator=g) * 1e-6
    k = max(1, int(math.ceil(fraction * h * w)))
    order = (per_pixel + jitter).argsort(dim=1, descending=True)[:, :k]
    keep = torch.ones(n, h * w)
    keep.scatter_(1, order, 0.0)
    with torch.inference_mode():
        before = target_probs(model, x, target)
        after = target_probs(model, x * keep.view(n, 1, h, w).to(x), target)
    return (before - after).cpu()


def random_drop(model: Model, x: torch.Tensor, target: torch.Tensor, fraction: float = 0.1,
                seed: int = 0) -> torch.Tensor:
    """The drop of ``p(target)`` when a random ``fraction`` of each crop's pixels is set to the baseline."""
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = x.shape
    return deletion_drop(model, x, target, torch.rand(n, h, w, generator=g), fraction, seed)


def labels_for(probs: torch.Tensor, wanted: Sequence[int | None]) -> torch.Tensor:
    """Per crop, the label to explain: the one asked for, else the most probable."""
    top = probs.argmax(1)
    return torch.tensor([int(top[i]) if want is None else int(want) for i, want in enumerate(wanted)],
                        dtype=torch.long)


# --- what the handlers share -------------------------------------------------------------------
EXPLAIN_HEADER = "explain"
"""The request header TorchServe's frontend sets to ``"True"`` on ``POST /explanations/<model>``;
``BaseHandler.handle`` reads it for the first request of a batch only, the handlers per request."""

EXPLAIN_FIELD = "explain"
"""The request field that asks for explanations where the header cannot be sent (gRPC ``Predictions``)."""

TARGET_FIELDS: tuple[str, ...] = ("target", "label")
"""Request fields naming the label to explain (a label or its index; TorchServe's own name is ``target``)."""


def wants_explanation(context: Any, idx: int, sources: Sequence[Mapping[str, Any]] = ()) -> bool:
    """Whether request ``idx`` of the batch asks for explanations: it came in through the
    explanations API (the ``explain`` header), or it sends an ``explain`` field (form field, JSON
    field, gRPC input: TorchServe 0.12's gRPC API has no ``Explanations`` call) that is true.
    Raises ``InputError(400)`` for a field that is neither true nor false."""
    wanted = False
    for source in sources:
        if source.get(EXPLAIN_FIELD) is not None:
            wanted = _flag(source[EXPLAIN_FIELD])
    if context is None or getattr(context, "_request_processor", None) is None:
        return wanted
    try:
        value = context.get_request_header(idx, EXPLAIN_HEADER)
    except (IndexError, KeyError, AttributeError):
        return wanted
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "replace")
    return wanted or str(value).strip().lower() == "true"


def _flag(value: Any) -> bool:
    text = (bytes(value).decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)).strip()
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise preprocess.InputError(f"explain must be true or false, not {text[:40]!r}", 400)


def parse_target(value: Any, labels: Sequence[str]) -> int:
    """A label to explain, by name or index, as its index; raises ``InputError(400)``."""
    text = bytes(value).decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)
    text = text.strip()
    if text.lower() in labels:
        return list(labels).index(text.lower())
    if not isinstance(value, (bool, float)) and text.isdigit() and int(text) < len(labels):
        return int(text)
    raise preprocess.InputError(f"target must be one of {', '.join(labels)} (or its index 0-{len(labels) - 1}), "
                                f"not {text[:40]!r}", 400)


def request_target(sources: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> int | None:
    """The label a request asks to explain (in its fields or JSON body), or None: the top label."""
    target = None
    for source in sources:
        for key in TARGET_FIELDS:
            if source.get(key) is not None:
                target = parse_target(source[key], labels)
    return target


class Explainer:
    """A handler's explanation settings (``explain_method``, ``explain_grid``) and the graph
    they run on: the served one, or, for a gradient method when the served graph is an optimized
    CPU graph (``handlers/cpu_graph.py``; the MKLDNN one gives no gradients), a plain copy from
    ``load_plain`` (about 6 MB more)."""

    def __init__(self, options: Mapping[str, Any], model: Model, optimized: bool,
                 load_plain: Callable[[], Model]) -> None:
        self.method = str(options["explain_method"])
        check_method(self.method)
        self.grid = int(options["explain_grid"])
        if self.grid < 1:
            raise ValueError(f"explain_grid must be positive, not {self.grid}")
        self.model = load_plain() if optimized and self.method in NEEDS_GRADIENTS else model

    def maps(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(N, grid, grid)`` maps for normalized crops and their labels."""
        return attribute(self.model, x, target, self.method, self.grid)

    def entry(self, label: str, cell_map: torch.Tensor, corners: list[list[float]]) -> dict[str, Any]:
        """One face's ``explanation`` in the answer."""
        return {"label": label, "method": self.method, "grid": self.grid, "map": rounded(cell_map),
                "corners": corners}


class BatchExplanations:
    """The explanation requests of one batch: per request index, the label asked for (None: the
    top label), its crops' corners in the picture (images) or its frames' box ``[0, 0, w, h]``
    (videos), and after inference its crops' (label, map)."""

    def __init__(self) -> None:
        self.targets: dict[int, int | None] = {}
        self.corners: dict[int, list[list[list[float]]]] = {}
        self.frame_box: dict[int, list[float]] = {}
        self.maps: dict[int, list[tuple[int, torch.Tensor]]] = {}

    def __bool__(self) -> bool:
        return bool(self.targets)

    def want(self, idx: int, target: int | None) -> None:
        self.targets[idx] = target
        self.corners[idx] = []

    def run(self, explainer: Explainer, x: torch.Tensor, probs: torch.Tensor, owners: Sequence[int]) -> None:
        """Maps for the crops of the explained requests; ``owners``: each row's request index."""
        rows = [r for r, idx in enumerate(owners) if idx in self.targets]
        if not rows:
            return
        target = labels_for(probs[rows], [self.targets[owners[r]] for r in rows])
        maps = explainer.maps(x[rows], target.to(x.device))
        for r, label, cell_map in zip(rows, target.tolist(), maps):
            self.maps.setdefault(owners[r], []).append((label, cell_map))


def leave_one_out(pool: Callable[[torch.Tensor], torch.Tensor], frame_probs: torch.Tensor, label: int) -> torch.Tensor:
    """How much each frame weighs in a clip's answer for ``label``: the pooled probability with
    every frame minus the pooled probability without that frame (``(T,)``; 0 for a single frame).
    Any pooling (``pool``: ``(T, K)`` → ``(K,)``), as the clip's answer was pooled."""
    n = frame_probs.shape[0]
    if n < 2:
        return torch.zeros(n)
    full = float(pool(frame_probs)[label])
    return torch.tensor([full - float(pool(torch.cat([frame_probs[:i], frame_probs[i + 1:]]))[label])
                         for i in range(n)])
