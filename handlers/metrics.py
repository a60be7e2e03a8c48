"""Custom model metrics of the handlers, through TorchServe's metrics API (``context.metrics``).

Every name here is declared in the repository's ``metrics.yaml`` (``metrics_config`` in
config.properties): TorchServe's frontend only publishes declared model metrics, and in
``metrics_mode=prometheus`` shows them on the metrics endpoint (``/metrics`` on port 8082).
All carry the dimensions ``ModelName`` and ``Level`` (and ``Hostname``, added by TorchServe).

One batch emits one line per metric, whatever its size (the worker logs each update for the
frontend to parse, so per-request lines would cost more at high request rates). Per-request
means come from the counters' ratios, e.g. decode ms per request =
``rate(emotion_decode_ms_total) / rate(emotion_requests_total)``::

    m = BatchMetrics(context)          # in preprocess
    with m.timed("decode"): ...        # per request, summed
    m.count(requests=3, faces=5)
    m.emit()                           # at the end of postprocess

Emitting never fails a request: without a metrics cache (unit tests) it does nothing, and an
error is logged once.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Iterator

from ts.metrics.metric_type_enum import MetricTypes

logger = logging.getLogger(__name__)

COUNTERS: dict[str, tuple[str, str]] = {
    # key: (metric name, unit)
    "requests": ("emotion_requests_total", "count"),      # requests answered 200
    "failed": ("emotion_failed_requests_total", "count"),  # requests answered 4xx/5xx
    "faces": ("emotion_faces_total", "count"),            # faces (image, live) / frames with a face (video)
    "decode": ("emotion_decode_ms_total", "ms"),          # decoding the media
    "detect": ("emotion_detect_ms_total", "ms"),          # face detection + alignment
    "inference": ("emotion_inference_ms_total", "ms"),    # model forward pass
}
HISTOGRAMS: dict[str, tuple[str, str]] = {
    "batch_size": ("emotion_batch_size", "count"),        # requests per TorchServe batch
}
DIMENSIONS = ("ModelName", "Level")

_warned: set[str] = set()


class BatchMetrics:
    """Collects one batch's figures and emits them through ``context.metrics``."""

    def __init__(self, context: Any) -> None:
        self.cache = getattr(context, "metrics", None)
        self.model_name = str(getattr(context, "model_name", "") or "")
        self.totals: dict[str, float] = {k: 0.0 for k in COUNTERS}
        self.batch_size: int | None = None

    def add(self, key: str, value: float) -> None:
        """Add ``value`` to counter ``key`` (one of :data:`COUNTERS`)."""
        self.totals[key] += float(value)

    def count(self, **values: float) -> None:
        """``add`` several counters: ``count(requests=3, faces=5)``."""
        for key, value in values.items():
            self.add(key, value)

    @contextlib.contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Add the block's wall time, in ms, to counter ``key``."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(key, (time.perf_counter() - t) * 1000.0)

    def emit(self) -> None:
        """Send the batch's counters and its batch size; never raises."""
        if self.cache is None:
            return
        dims = [self.model_name or str(getattr(self.cache, "model_name", "") or ""), "Model"]
        for key, (name, unit) in COUNTERS.items():
            value = self.totals[key]
            if value > 0:
                self._update(name, unit, "counter", round(value, 3), dims)
        if self.batch_size:
            name, unit = HISTOGRAMS["batch_size"]
            self._update(name, unit, "histogram", self.batch_size, dims)

    def _update(self, name: str, unit: str, kind: str, value: float, dims: list[str]) -> None:
        try:
            mtype = MetricTypes(kind)
            try:
                metric = self.cache.get_metric(name, mtype)
            except Exception:  # not declared in the metrics yaml the worker was given
                if name not in _warned:
                    _warned.add(name)
                    logger.warning("metric %s is not declared in the metrics config: the frontend "
                                   "will not publish it", name)
                metric = self.cache.add_metric_to_cache(name, unit, list(DIMENSIONS), mtype)
            metric.add_or_update(value, dims)
        except Exception as e:  # metrics are best effort
            if f"error:{name}" not in _warned:
                _warned.add(f"error:{name}")
                logger.warning("cannot emit metric %s: %s", name, e)
