"""The graph a TorchScript model runs on the CPU: the handler option ``optimize``
(:data:`contract.CPU_GRAPHS`).

* ``onednn`` (the default): oneDNN Graph fusion (``torch.jit.enable_onednn_fusion``). TorchScript's
  profiling executor compiles fused oneDNN partitions for each input shape it has seen, which
  removes most of PyTorch's per-operator cost: the cost that dominates a small network at batch 1.
  A new shape costs a compile (about 0.3 s) and the executor keeps only a dozen, so batches are
  padded up to :data:`contract.BATCH_BUCKETS` (:class:`PaddedBatches`), and every bucket is compiled
  at start-up. The fusion switch is process-wide: a worker holds one model.
* ``mkldnn``: ``torch.jit.optimize_for_inference`` (MKLDNN tensors and prepacked weights).
* ``off``: the frozen graph as exported.

Measured by ``bench/bench_model.py --optimize`` (pretrain/MODEL_CARD.md). Whatever the mode, the
faster graph is kept only if it gives the plain graph's output on an example batch; otherwise the
handler falls back to the plain graph, so an optimisation never fails a worker.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Sequence

import torch

try:  # inside the repository (package import)
    from .contract import BATCH_BUCKETS, CPU_GRAPHS
except ImportError:  # inside a .mar the shared modules sit flat beside the handler
    from contract import BATCH_BUCKETS, CPU_GRAPHS  # type: ignore[no-redef]

logger = logging.getLogger(__name__)


def cpu_graph_mode(value: Any) -> str:
    """The option ``optimize`` as one of :data:`contract.CPU_GRAPHS`: a mode's name, or a boolean
    as archives before the oneDNN mode wrote it (``true``: the default mode, ``false``: ``off``)."""
    if isinstance(value, bool) or value is None:
        return CPU_GRAPHS[0] if value else "off"
    mode = str(value).strip().lower()
    if mode not in CPU_GRAPHS:
        raise ValueError(f"handler option optimize must be one of {', '.join(CPU_GRAPHS)}, not {value!r}")
    return mode


def bucket_size(n: int, buckets: Sequence[int] = BATCH_BUCKETS) -> int:
    """The smallest bucket that holds ``n`` inputs (``n`` at most the largest bucket)."""
    return next(b for b in buckets if b >= n)


class PaddedBatches:
    """A shape-specialised model called only at the bucket sizes: a batch is cut into chunks of
    the largest bucket and each chunk is padded with zeros up to its bucket; the padding's
    outputs are dropped, so the answer for each input is the model's own."""

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor],
                 buckets: Sequence[int] = BATCH_BUCKETS) -> None:
        self.model = model
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))
        if not self.buckets or self.buckets[0] < 1:
            raise ValueError(f"batch buckets must be positive sizes, not {buckets!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output for every row of ``x``."""
        if x.shape[0] == 0:
            return self.model(x.new_zeros((1, *x.shape[1:])))[:0]
        top = self.buckets[-1]
        outs = [self._padded(x[i:i + top]) for i in range(0, x.shape[0], top)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    __call__ = forward

    def _padded(self, chunk: torch.Tensor) -> torch.Tensor:
        n = chunk.shape[0]
        size = bucket_size(n, self.buckets)
        if size > n:
            chunk = torch.cat([chunk, chunk.new_zeros((size - n, *chunk.shape[1:]))])
        return self.model(chunk)[:n]

    def warm_up(self, item_shape: Sequence[int], device: torch.device | str = "cpu") -> None:
        """Run every bucket until the executor has compiled it (its profiling runs, then one)."""
        runs = torch._C._jit_get_num_profiled_runs() + 1
        with torch.inference_mode():
            for b in self.buckets:
                x = torch.zeros((b, *item_shape), device=device)
                for _ in range(runs):
                    self.model(x)


def _faster_graph(model: Any, mode: str, example: torch.Tensor) -> Any:
    if mode == "onednn":
        torch.jit.enable_onednn_fusion(True)
        fast = PaddedBatches(model)
        fast.warm_up(example.shape[1:], example.device)
        return fast
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.optimize_for_inference(model)


def optimize_for_cpu(model: Any, example: torch.Tensor, reload: Callable[[], Any],
                     mode: Any = CPU_GRAPHS[0], atol: float = 1e-4, rtol: float = 1e-3) -> tuple[Any, str]:
    """``model`` (TorchScript) on the graph ``mode`` names (:func:`cpu_graph_mode`) and the mode in
    use; a model off the CPU (``example``'s device) stays as it is (``off``). The faster graph is
    kept only if it gives a freshly loaded plain model's output (``reload()``) on ``example``;
    otherwise (both passes change the model in place) a plain model from ``reload()``, ``off``."""
    mode = cpu_graph_mode(mode)
    if mode == "off" or example.device.type != "cpu":
        return model, "off"
    with torch.inference_mode():
        want = reload()(example)
    try:
        fast = _faster_graph(model, mode, example)
        with torch.inference_mode():
            got = fast(example)
        if got.shape == want.shape and torch.allclose(got, want, atol=atol, rtol=rtol):
            return fast, mode
        logger.warning("CPU graph %s changed the output (max abs diff %.3g): not used", mode,
                       (got - want).abs().max().item())
    except Exception as e:  # an optimisation only: never fail loading for it
        logger.warning("CPU graph %s failed (%s): not used", mode, e)
    if mode == "onednn":
        torch.jit.enable_onednn_fusion(False)
    return reload(), "off"
