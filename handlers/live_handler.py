"""TorchServe handler for live streams: one frame per request of a sequence, per-person emotions out.

The archive (``emotion_live``) holds the video model's per-frame network and spec, and TorchServe's
sequence batching is on (``model-config.yaml``: ``sequenceBatching``, ``maxNumSequence``,
``sequenceMaxIdleMSec``): every request carries a sequence id (REST header
``ts_request_sequence_id``, gRPC ``StreamPredictions2``'s ``sequence_id``; TorchServe makes one for
a request without it, which the answer carries in its body and that response header), a
sequence's requests reach the same worker in order, and a batch holds one frame from each of
several sequences. TorchServe refuses a sequence beyond ``maxNumSequence`` itself (503).

Per sequence the worker keeps the people in view and their recent answers (``live_state``, the steps
in ``live_engine``, which the SDK's ``recognize_stream`` shares): faces
are detected on every ``keyframe_every``-th frame (all the batch's keyframes in one detector
call) and followed in between; each person's face is aligned as the video handler aligns it and
scored by one forward pass over the batch. Answer per frame::

    {"sequence": "...", "frame": 12, "time": 1.1, "new": false, "keyframe": true,
     "people": [{"id": 0, "box": [x1, y1, x2, y2], "frames": 11, "smoothing": "pooled",
                 "top3": [smoothed {"label", "probability"} x 3], "frame_top3": [this frame's],
                 "probabilities": {label: smoothed probability, all seven}}]}

``top3`` is smoothed: the video model's pooling (``video_pool``, the spec's ``extra.pooling``) over
the person's frames of the last ``smooth_seconds`` once there are ``min_frames`` of them, the mean
before (``smoothing``: ``pooled`` or ``mean``); ``frame_top3`` is this frame's alone. A frame may
send ``time`` (seconds in its stream: multipart/JSON field or gRPC input) for the smoothing window;
without it the time since the sequence's first frame is used. An unknown or expired sequence id
starts afresh (``new``: true, ``frame``: 1). The REST request header ``ts_request_sequence_end:
true`` (over gRPC the input of that name, :meth:`EmotionLiveHandler.ends`) closes the sequence
after its frame (a request without a frame only closes it) and frees its state (``closed``: true). A worker keeps at most ``max_sequences``
sequences (429 for one more) and expires those idle for ``idle_seconds``. A bad frame gets its
own 4xx JSON error while the rest of the batch is answered; the sequence goes on.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler

try:  # inside the repository (package import)
    from . import common, cpu_graph, faces, preprocess, video_decode
    from . import metrics as handler_metrics
    from .live_engine import LiveEngine, LiveFrame
except ImportError:  # inside a .mar the shared modules sit flat beside the handler
    import common  # type: ignore[no-redef]
    import cpu_graph  # type: ignore[no-redef]
    import faces  # type: ignore[no-redef]
    import metrics as handler_metrics  # type: ignore[no-redef]
    import preprocess  # type: ignore[no-redef]
    import video_decode  # type: ignore[no-redef]
    from live_engine import LiveEngine, LiveFrame  # type: ignore[no-redef]

logger = logging.getLogger(__name__)

BODY_NAMES = ("frame", "image", "file")
TRUE = ("1", "true", "yes", "on")
LiveBatch = tuple[list[LiveFrame], common.Failures, int]  # usable frames, failures, requests


def _field(sources: list, name: str) -> str | None:
    """A per-request option as text (form field, JSON field or gRPC input), or None."""
    for src in sources:
        value = src.get(name)
        if value is not None:
            return bytes(value).decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)
    return None


def _seconds(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise preprocess.InputError(f"time must be a number of seconds, not {text[:40]!r}", 400) from None


class EmotionLiveHandler(BaseHandler):
    """Stateful per-person emotions over a stream of frames (see module docstring)."""

    def initialize(self, context: Any) -> None:
        """Load the per-frame model, the detector, the options and an empty sequence store."""
        self.context = context
        self.manifest = context.manifest
        opts = common.handler_options(context, "live")
        self.device = common.select_device(context, opts)
        self.model, self.spec = common.load_scripted_model(context, self.device)
        detector = None if str(opts["detection"]) == "never" else faces.detector_for(
            opts, self.device, max_faces=int(opts["max_people"]))
        self.engine = LiveEngine(self.spec, opts, detector)
        video_decode.reuse_frame_memory()
        self.labels = self.engine.labels
        example = torch.randn(2, *self.engine.pipeline.input_shape(), generator=torch.Generator().manual_seed(0))
        self.model, self.cpu_graph = cpu_graph.optimize_for_cpu(
            self.model, example.to(self.device), lambda: common.load_scripted_model(context, self.device)[0],
            opts["optimize"])
        self.batch_metrics = handler_metrics.BatchMetrics(None)  # replaced per batch
        self.initialized = True
        logger.info("loaded %s (%s) on %s, %d threads, CPU graph %s; live limits %s, pooling %s",
                    self.manifest["model"]["serializedFile"], self.spec.get("arch"), self.device,
                    torch.get_num_threads(), self.cpu_graph, self.engine.limits, self.engine.pipeline.pooling)

    # --- stages -----------------------------------------------------------------------------
    def preprocess(self, data: list[Any]) -> LiveBatch:
        """Read each frame and its sequence, detect on the keyframes, follow the faces, crop them."""
        failures = common.Failures()
        frames: list[LiveFrame] = []
        # this batch's figures (handlers/metrics.py); a worker runs one batch at a time
        self.batch_metrics = m = handler_metrics.BatchMetrics(self.context)
        m.batch_size = len(data)
        gone = self.engine.store.expire()
        if gone:
            logger.info("live sequences expired: %s", ", ".join(gone))
        for idx, row in enumerate(data):
            try:
                with m.timed("decode"):
                    frames.append(self.read_request(idx, row))
            except Exception as e:  # one bad request must not fail the batch
                failures.add_exception(idx, e, default_status=400)
        with m.timed("detect"):  # keyframe detection, tracking, alignment
            self.engine.detect(frames, failures)
            self.engine.follow(frames, failures)
        return [f for f in frames if f.idx not in failures], failures, len(data)

    def read_request(self, idx: int, row: Any) -> LiveFrame:
        """The request's sequence, frame, time and end flag (see :meth:`ends`)."""
        ctx = self.context
        sources = common.option_sources(row)
        end = self.ends(idx, sources)
        if isinstance(row, dict):  # the options are not the frame
            row = {k: v for k, v in row.items() if k not in (ctx.header_key_sequence_end, "time")}
        try:
            data: bytes | None = common.extract_body(row, BODY_NAMES)
        except preprocess.InputError:
            if not end:
                raise
            data = None  # a request that only closes its sequence
        return self.engine.frame(idx, str(ctx.get_sequence_id(idx) or ""), data, _seconds(_field(sources, "time")), end)

    def ends(self, idx: int, sources: list) -> bool:
        """Whether the request closes its sequence: the input (gRPC), form or JSON field
        ``ts_request_sequence_end`` is true, or, over REST, the request header of that name.
        Over gRPC the header says nothing: TorchServe 0.12's ``StreamPredictions2`` sets it to
        "true" on every request (it reads the input through the protobuf object's ``toString``),
        so it is taken only from requests that came over HTTP (they carry a ``Host`` header)."""
        ctx = self.context
        key = ctx.header_key_sequence_end
        if (_field(sources, key) or "").lower() in TRUE:
            return True
        return ctx.get_request_header(idx, "Host") is not None and \
            str(ctx.get_request_header(idx, key) or "").lower() in TRUE

    def inference(self, batch: LiveBatch, *args: Any, **kwargs: Any) -> tuple[LiveBatch, torch.Tensor]:
        """One forward pass over every face of the batch; probabilities on the CPU."""
        crops = [c for f in batch[0] for c in f.crops]
        if not crops:
            return batch, torch.empty(0, len(self.labels))
        with self.batch_metrics.timed("inference"), torch.inference_mode():
            probs = torch.softmax(self.model(torch.stack(crops).to(self.device)).float(), dim=1).cpu()
        return batch, probs

    def postprocess(self, data: tuple[LiveBatch, torch.Tensor]) -> list[Any]:
        """One answer (or that request's error) per request."""
        (frames, failures, n), probs = data
        results: list[Any] = [None] * n
        for idx, answer in self.engine.answers(frames, probs).items():
            results[idx] = answer  # and the sequence id in the response header, as TorchServe names it
            self.context.set_response_header(idx, self.context.header_key_sequence_id, answer["sequence"])
        self.batch_metrics.count(requests=n - len(failures), failed=len(failures),
                                 faces=sum(len(f.people) for f in frames))
        self.batch_metrics.emit()
        return failures.apply(self.context, results)
