"""TorchServe handler for the video model: an encoded video in, overall and timeline emotions out.

Per request: probe the container (limits from ``model-config.yaml``'s ``handler:`` section),
sample ``clip_len`` frames uniformly over the whole video and, for a video longer than one
window, ``clip_len`` frames in each timeline window; decode the union of those frames in one
pass. Faces are detected on every sampled frame of every request of the batch at once; each
frame uses its largest face, aligned like the image handler's. A frame where none is found is
cropped at the nearest frame's face (in time), or classified whole when the video has no face
at all. All clips of the batch (overall and windows) go through the model in one forward pass.

Answer: ``{"top3": [...], "duration": s, "frames": n, "fps": f, "faces": {"found_frames": k,
"sampled_frames": m, "whole_frame": bool}, "timeline": [{"start", "end", "top3"}, ...]}``
(``timeline`` only for videos longer than one window); a request that cannot be used gets its
own 4xx and ``{"code", "type", "message"}`` while the rest of the batch is answered.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

try:  # inside the repository (package import)
    from . import common, faces, preprocess, video_decode
    from . import metrics as handler_metrics
    from .video_batch import VideoBatch, VideoRequest
except ImportError:  # inside a .mar the shared modules sit flat beside the handler
    import common  # type: ignore[no-redef]
    import faces  # type: ignore[no-redef]
    import metrics as handler_metrics  # type: ignore[no-redef]
    import preprocess  # type: ignore[no-redef]
    import video_decode  # type: ignore[no-redef]
    from video_batch import VideoBatch, VideoRequest  # type: ignore[no-redef]

logger = logging.getLogger(__name__)

# TorchServe requires the handler module to define exactly one class: the request and batch
# records live in ``video_batch``.

BODY_NAMES = ("video", "file")
DETECTION_MODES = ("auto", "always", "never")


class EmotionVideoHandler(BaseHandler):
    """Batched video emotion recognition on the archive's TorchScript model."""

    def initialize(self, context: Any) -> None:
        """Load the model and its spec, the face detector and the limits from the config."""
        self.context = context
        self.manifest = context.manifest
        opts = common.handler_options(context)
        self.topk = int(opts.get("topk", 3))
        self.limits = video_decode.VideoLimits.from_mapping(opts)
        self.window_seconds = float(opts.get("window_seconds", 2.0))
        self.window_stride = float(opts.get("window_stride", self.window_seconds))
        self.max_windows = max(1, int(opts.get("max_windows", 30)))
        self.detection = str(opts.get("detection", "auto"))
        if self.detection not in DETECTION_MODES:
            raise ValueError(f"detection must be one of {DETECTION_MODES}, not {self.detection!r}")
        self.device = common.select_device(context, opts)
        self.model, self.spec = common.load_scripted_model(context, self.device)
        self.labels = list(self.spec["labels"])
        self.clip_len = int(self.spec["clip_len"])
        self.time_dim = self._time_dim(self.spec)
        self.optimized = False
        if self.device.type == "cpu" and bool(opts.get("optimize", True)):
            example = torch.randn(2, *self._clip_shape(), generator=torch.Generator().manual_seed(0))
            self.model = common.optimize_for_cpu(
                self.model, example, lambda: common.load_scripted_model(context, self.device)[0])
            self.optimized = "mkldnn" in str(getattr(self.model, "graph", "")).lower()
        self.detector = None
        if self.detection != "never":
            # one face per frame is used: the detector keeps only the largest
            # and frames are downscaled to detect_max_side (MTCNN's cost grows with the pixels)
            self.detector = faces.FaceDetector(device=self.device, max_faces=1,
                                               min_face_size=int(opts.get("min_face_size", 20)),
                                               max_side=int(opts.get("detect_max_side", faces.MAX_DETECT_SIDE)))
        self._warm_up()
        self.batch_metrics = handler_metrics.BatchMetrics(None)  # replaced per batch
        self.initialized = True
        logger.info("loaded %s (%s) on %s, %d threads, optimized %s; faces %s; %s",
                    self.manifest["model"]["serializedFile"], self.spec.get("arch"), self.device,
                    torch.get_num_threads(), self.optimized, self.detection, self.limits)

    @staticmethod
    def _time_dim(spec: dict[str, Any]) -> int:
        """Where time sits in one clip's tensor: 1 for ``(C, T, S, S)`` (the default), 0 for ``(T, C, S, S)``."""
        shape = list((spec.get("extra") or {}).get("input_shape") or [])
        c, t = int(spec["channels"]), int(spec["clip_len"])
        if len(shape) == 4 and shape[0] == t and shape[1] == c and shape[0] != shape[1]:
            return 0
        return 1

    def _clip_shape(self) -> tuple[int, ...]:
        c, s = int(self.spec["channels"]), int(self.spec["input_size"])
        return (c, self.clip_len, s, s) if self.time_dim == 1 else (self.clip_len, c, s, s)

    def _warm_up(self) -> None:
        with torch.inference_mode():
            out = self.model(torch.zeros(1, *self._clip_shape(), device=self.device))
        if tuple(out.shape) != (1, len(self.labels)):
            raise RuntimeError(f"model output shape {tuple(out.shape)}, expected (1, {len(self.labels)})")

    # --- stages -----------------------------------------------------------------------------
    def preprocess(self, data: list[Any]) -> VideoBatch:
        """Probe and decode each request, find the faces of all sampled frames, stack the clips."""
        batch = VideoBatch(len(data))
        # this batch's figures (handlers/metrics.py); a worker runs one batch at a time
        self.batch_metrics = m = handler_metrics.BatchMetrics(self.context)
        m.batch_size = len(data)
        for idx, row in enumerate(data):
            try:
                with m.timed("decode"):  # probe and decode the sampled frames
                    batch.requests.append(self.decode_request(idx, common.extract_body(row, BODY_NAMES)))
            except Exception as e:  # one bad request must not fail the batch
                batch.failures.add_exception(idx, e, default_status=400)
        with m.timed("detect"):  # detection, alignment and model inputs
            self.crop_faces(batch)
        clips = [self.clip_tensor(req, clip) for req in batch.requests for clip in req.clips]
        if clips:
            batch.clips = torch.stack(clips)
        logger.info("video batch of %d requests: %d clips, %d failed", len(data), len(clips), len(batch.failures))
        return batch

    def decode_request(self, idx: int, data: bytes) -> VideoRequest:
        """Probe within the limits, plan the clips, decode their frames in one pass."""
        info = video_decode.probe_video(data, self.limits)
        clips = [video_decode.sample_indices(info.n_frames, self.clip_len)]
        wins: list[video_decode.Window] = []
        if info.duration > self.window_seconds + 1e-6:
            span = info.duration - self.window_seconds
            stride = max(self.window_stride, span / max(self.max_windows - 1, 1))
            wins = video_decode.windows(info.timestamps, self.window_seconds, stride, self.clip_len,
                                        duration=info.duration)[: self.max_windows]
            clips += [w.indices for w in wins]
        wanted = sorted({i for clip in clips for i in clip})
        frames = video_decode.decode_frames(data, wanted, self.limits)
        return VideoRequest(idx, info, clips, wins, frames={i: frames[i] for i in wanted})

    def crop_faces(self, batch: VideoBatch) -> None:
        """Model inputs for every sampled frame: the largest face, aligned (see module docstring)."""
        reqs = batch.requests
        found: dict[tuple[int, int], faces.FaceCrop] = {}
        if self.detection != "never" and reqs:
            keys = [(r, i) for r, req in enumerate(reqs) for i in sorted(req.frames)
                    if self.detection == "always" or max(req.frames[i].size) > faces.TIGHT_MAX_SIDE]
            found = self._detect(batch, keys)
        size, margin, channels = int(self.spec["input_size"]), self.spec.get("face_margin"), int(self.spec["channels"])
        pil_mode = "L" if channels == 1 else "RGB"
        for r, req in enumerate(reqs):
            if req.idx in batch.failures:
                continue
            order = sorted(req.frames)
            mine = {i: found[(r, i)] for i in order if (r, i) in found}
            req.found = len(mine)
            for i in order:
                img = req.frames[i]
                crop = mine.get(i) or self._nearest(mine, i)
                if crop is None or (self.detection == "auto" and faces.is_tight_crop(img, [crop.face])):
                    face_img = img.convert(pil_mode)  # preprocess resizes it
                elif i in mine:
                    face_img = crop.image
                else:  # no face in this frame: crop where the nearest frame's face is
                    face_img = faces.align_face(img.convert(pil_mode), crop.face, size, margin)
                req.crops[i] = preprocess.to_model_input(face_img, self.spec)
            req.frames.clear()  # the decoded frames are no longer needed
        batch.requests = [req for req in reqs if req.idx not in batch.failures]

    def _detect(self, batch: VideoBatch, keys: list[tuple[int, int]]) -> dict[tuple[int, int], faces.FaceCrop]:
        """Detect on all frames at once; if that fails, per request (failing only the culprit)."""
        reqs = batch.requests
        size, margin, channels = int(self.spec["input_size"]), self.spec.get("face_margin"), int(self.spec["channels"])

        def run(ks: list[tuple[int, int]]) -> dict[tuple[int, int], faces.FaceCrop]:
            per_frame = faces.faces_for_images([reqs[r].frames[i] for r, i in ks], self.detector, "always",
                                               size, margin, channels)
            return {k: crops[0] for k, crops in zip(ks, per_frame) if crops}

        try:
            return run(keys)
        except Exception:
            logger.exception("face detection failed on the batch; retrying per request")
        out: dict[tuple[int, int], faces.FaceCrop] = {}
        for r, req in enumerate(reqs):
            try:
                out.update(run([k for k in keys if k[0] == r]))
            except Exception as e:
                batch.failures.add_exception(req.idx, e)
        return out

    @staticmethod
    def _nearest(found: dict[int, faces.FaceCrop], i: int) -> faces.FaceCrop | None:
        """The face of the frame nearest to frame ``i`` that has one (the earlier one on a tie)."""
        if not found:
            return None
        return found[min(found, key=lambda j: (abs(j - i), j))]

    def clip_tensor(self, req: VideoRequest, clip: list[int]) -> torch.Tensor:
        """One clip in the model's layout, frames in temporal order."""
        return torch.stack([req.crops[i] for i in clip], dim=self.time_dim)

    def inference(self, batch: VideoBatch, *args: Any, **kwargs: Any) -> tuple[VideoBatch, torch.Tensor]:
        """One forward pass over every clip of the batch; probabilities on the CPU."""
        if batch.clips is None:
            return batch, torch.empty(0, len(self.labels))
        with self.batch_metrics.timed("inference"), torch.inference_mode():
            logits = self.model(batch.clips.to(self.device))
            probs = torch.softmax(logits.float(), dim=1).cpu()
        return batch, probs

    def postprocess(self, data: tuple[VideoBatch, torch.Tensor]) -> list[Any]:
        """Exactly one response per request: overall top-k and timeline, or that request's error."""
        batch, probs = data
        rows = probs.tolist()
        results: list[Any] = [None] * batch.n_requests
        key = f"top{self.topk}"
        pos = 0
        for req in batch.requests:
            mine, pos = rows[pos:pos + len(req.clips)], pos + len(req.clips)
            info = req.info
            answer: dict[str, Any] = {
                key: common.topk(mine[0], self.labels, self.topk),
                "duration": round(info.duration, 3), "frames": info.n_frames, "fps": round(info.fps, 3),
                "faces": {"found_frames": req.found, "sampled_frames": len(req.crops),
                          "whole_frame": req.found == 0},
            }
            if req.windows:
                answer["timeline"] = [{"start": round(w.start, 3), "end": round(w.end, 3),
                                       key: common.topk(row, self.labels, self.topk)}
                                      for w, row in zip(req.windows, mine[1:])]
            results[req.idx] = answer
        failed = len(batch.failures)
        self.batch_metrics.count(requests=batch.n_requests - failed, failed=failed,
                                 faces=sum(req.found for req in batch.requests))
        self.batch_metrics.emit()
        return batch.failures.apply(self.context, results)
