"""TorchServe handler for the video model: an encoded video in, overall, timeline and per-person emotions out.

The steps are ``video_pipeline``'s (shared with ``training.evaluate --task video``): per request,
probe (limits from ``model-config.yaml``'s ``handler:`` section), sample frames and decode them
in one pass; detect faces on keyframes only, for every request of the batch at once, and track
them between keyframes (``video_track``); align each tracked face on each sampled frame. One
forward pass scores every crop of the batch (a per-frame model, pooled per clip by the spec's
``pooling``) or every clip (a clip model).

Answer: ``{"top3": [...], "duration": s, "frames": n, "fps": f, "faces": {"found_frames": k,
"sampled_frames": m, "whole_frame": bool, "detected_frames": d}, "timeline": [{"start", "end",
"top3"}, ...], "people": [{"id", "box", "start", "end", "found_frames", "detected_frames", "top3",
"timeline"}, ...]}``. The top-level answer is the main (most present) person's; ``timeline`` only
for videos longer than one window; ``people`` only when a face was found. A request that cannot
be used gets its own 4xx and ``{"code", "type", "message"}`` while the rest of the batch is answered.

``POST /explanations/emotion_video`` (a per-frame model) answers the same, plus per person an
``explanation``: the ``explain_frames`` sampled frames that weighed most in the person's answer
for the whole clip (leave-one-out through the clip's pooling: the pooled probability of the
person's top label, or of ``target``, with the frame minus without it), most first, each
``{"frame", "time", "weight", "probability", "explanation": {"label", "method", "grid", "map",
"corners"}}`` as the image handler's map of that frame's face crop (``handlers/explain.py``).
A clip model (the hybrid CNN-RNN + C3D) gets 400: its explanations are not offered.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler

try:  # inside the repository (package import)
    from . import common, cpu_graph, explain, faces, preprocess, video_decode, video_pipeline
    from . import metrics as handler_metrics
    from .video_batch import VideoBatch, VideoRequest
except ImportError:  # inside a .mar the shared modules sit flat beside the handler
    import common  # type: ignore[no-redef]
    import cpu_graph  # type: ignore[no-redef]
    import explain  # type: ignore[no-redef]
    import faces  # type: ignore[no-redef]
    import metrics as handler_metrics  # type: ignore[no-redef]
    import preprocess  # type: ignore[no-redef]
    import video_decode  # type: ignore[no-redef]
    import video_pipeline  # type: ignore[no-redef]
    from video_batch import VideoBatch, VideoRequest  # type: ignore[no-redef]

logger = logging.getLogger(__name__)


def _frame_size(req: VideoRequest) -> tuple[int, int]:
    """Width and height of the request's decoded (upright) frames."""
    return next(iter(req.frames.values())).size if req.frames else (req.info.width, req.info.height)

# TorchServe requires the handler module to define exactly one class: the request and batch
# records live in ``video_batch``.

BODY_NAMES = ("video", "file")


class EmotionVideoHandler(BaseHandler):
    """Batched video emotion recognition on the archive's TorchScript model."""

    def initialize(self, context: Any) -> None:
        """Load the model and its spec, the face detector and the options from the config."""
        self.context = context
        self.manifest = context.manifest
        opts = common.handler_options(context, "video")
        self.device = common.select_device(context, opts)
        self.model, self.spec = common.load_scripted_model(context, self.device)
        self.labels = list(self.spec["labels"])
        detector = None
        if str(opts["detection"]) != "never":
            # frames are downscaled to detect_max_side for detection (its cost grows with the
            # pixels); up to max_people faces per frame are kept and tracked
            detector = faces.detector_for(opts, self.device, max_faces=int(opts["max_people"]))
        self.pipeline = video_pipeline.VideoPipeline(self.spec, opts, detector)
        video_decode.reuse_frame_memory()
        self.limits = self.pipeline.limits
        self.clip_len = self.pipeline.clip_len
        self.time_dim = self.pipeline.time_dim
        example = torch.randn(2, *self.pipeline.input_shape(), generator=torch.Generator().manual_seed(0))
        # handlers/cpu_graph.py: the faster CPU graph in use ("off" on a GPU or when none is)
        self.model, self.cpu_graph = cpu_graph.optimize_for_cpu(
            self.model, example.to(self.device), lambda: common.load_scripted_model(context, self.device)[0],
            opts["optimize"])
        self.optimized = self.cpu_graph != "off"
        self.explainer = explain.Explainer(opts, self.model, self.optimized,
                                           lambda: common.load_scripted_model(context, self.device)[0])
        self.explain_frames = max(1, int(opts["explain_frames"]))
        self._warm_up()
        self.batch_metrics = handler_metrics.BatchMetrics(None)  # replaced per batch
        self.batch_explain = explain.BatchExplanations()  # likewise
        self.initialized = True
        logger.info("loaded %s (%s) on %s, %d threads, CPU graph %s; faces %s, pooling %s; %s",
                    self.manifest["model"]["serializedFile"], self.spec.get("arch"), self.device,
                    torch.get_num_threads(), self.cpu_graph, self.pipeline.detection,
                    self.pipeline.pooling if self.pipeline.frame_model else "in the model", self.limits)

    def _warm_up(self) -> None:
        with torch.inference_mode():
            out = self.model(torch.zeros(1, *self.pipeline.input_shape(), device=self.device))
        if tuple(out.shape) != (1, len(self.labels)):
            raise RuntimeError(f"model output shape {tuple(out.shape)}, expected (1, {len(self.labels)})")

    # --- stages -----------------------------------------------------------------------------
    def preprocess(self, data: list[Any]) -> VideoBatch:
        """Probe and decode each request, track the faces of all requests, stack the model inputs."""
        batch = VideoBatch(len(data))
        # this batch's figures (handlers/metrics.py); a worker runs one batch at a time
        self.batch_metrics = m = handler_metrics.BatchMetrics(self.context)
        self.batch_explain = explaining = explain.BatchExplanations()
        m.batch_size = len(data)
        for idx, row in enumerate(data):
            try:
                sources = common.option_sources(row)
                if explain.wants_explanation(self.context, idx, sources):
                    if not self.pipeline.frame_model:
                        raise preprocess.InputError("video explanations are offered for per-frame video "
                                                    "models only; this archive holds a clip model", 400)
                    explaining.want(idx, explain.request_target(sources, self.labels))
                with m.timed("decode"):  # probe and decode the sampled frames
                    batch.requests.append(self.decode_request(idx, common.extract_body(row, BODY_NAMES)))
            except Exception as e:  # one bad request must not fail the batch
                batch.failures.add_exception(idx, e, default_status=400)
        with m.timed("detect"):  # keyframe detection, tracking, alignment and model inputs
            self.crop_faces(batch)
        batch.clips = self.pipeline.inputs(batch.requests)
        logger.info("video batch of %d requests: %d clips, %d failed", len(data),
                    sum(len(p.clips) for r in batch.requests for p in r.people), len(batch.failures))
        return batch

    def decode_request(self, idx: int, data: bytes) -> VideoRequest:
        """Probe within the limits, plan the frames, decode them in one pass."""
        return self.pipeline.read(idx, data)

    def crop_faces(self, batch: VideoBatch) -> None:
        """Detect on keyframes, track, and build each person's model inputs (see module docstring)."""
        self.pipeline.track(batch)
        for req in batch.requests:
            if req.idx in batch.failures:
                continue
            try:
                if req.idx in self.batch_explain.targets:  # the frames' size, for whole-frame corners
                    self.batch_explain.frame_box[req.idx] = [0.0, 0.0, *map(float, _frame_size(req))]
                self.pipeline.people(req)
            except Exception as e:
                batch.failures.add_exception(req.idx, e)
        batch.requests = [req for req in batch.requests if req.idx not in batch.failures]

    def inference(self, batch: VideoBatch, *args: Any, **kwargs: Any) -> tuple[VideoBatch, torch.Tensor]:
        """One forward pass over every model input of the batch; probabilities on the CPU."""
        if batch.clips is None:
            return batch, torch.empty(0, len(self.labels))
        with self.batch_metrics.timed("inference"), torch.inference_mode():
            logits = self.model(batch.clips.to(self.device))
            probs = torch.softmax(logits.float(), dim=1).cpu()
        return batch, probs

    def explain_handle(self, data_preprocess: VideoBatch, raw_data: list[Any]) -> list[Any]:
        """``POST /explanations``: the predictions' answer with each person's weightiest frames and
        their maps (``postprocess`` adds them for every request that came in as an explanation)."""
        return self.postprocess(self.inference(data_preprocess))

    def explain_person(self, req: VideoRequest, person: Any, target: int | None) -> list[dict[str, Any]]:
        """The frames that weighed most in ``person``'s answer for the whole clip, each with its map."""
        order = sorted(person.frame_probs)
        frame_probs = torch.stack([person.frame_probs[i] for i in order])
        label = int(person.probs[0].argmax()) if target is None else target
        weights = explain.leave_one_out(self.pipeline.pool, frame_probs, label)
        top = sorted(range(len(order)), key=lambda k: (-float(weights[k]), order[k]))[: self.explain_frames]
        x = torch.stack([person.crops[order[k]] for k in top]).to(self.device)
        maps = self.explainer.maps(x, torch.full((len(top),), label, dtype=torch.long, device=self.device))
        times = req.info.timestamps
        out = []
        for k, cell_map in zip(top, maps):
            i = order[k]
            out.append({"frame": i, "time": round(times[i] - times[0], 3), "weight": round(float(weights[k]), 6),
                        "probability": round(float(frame_probs[k, label]), 6),
                        "explanation": self.explainer.entry(self.labels[label], cell_map,
                                                            self._corners(req, person, i))})
        return out

    def _corners(self, req: VideoRequest, person: Any, i: int) -> list[list[float]]:
        """Where the person's crop of frame ``i`` lies in the frame (as ``video_pipeline.people`` cut it)."""
        box = self.batch_explain.frame_box[req.idx]
        if person.track is None:
            return explain.crop_corners(None, box, self.pipeline.size, self.pipeline.margin)
        faces_of = person.track.faces
        face = faces_of.get(i) or faces_of[min(faces_of, key=lambda j: (abs(j - i), j))]
        if self.pipeline.detection == "auto" and max(box[2], box[3]) <= faces.TIGHT_MAX_SIDE:
            face = None  # a face crop already: classified whole
        return explain.crop_corners(face, box, self.pipeline.size, self.pipeline.margin)

    def postprocess(self, data: tuple[VideoBatch, torch.Tensor]) -> list[Any]:
        """Exactly one response per request: its answer, or that request's error."""
        batch, probs = data
        results: list[Any] = [None] * batch.n_requests
        self.pipeline.assign(batch.requests, probs)
        for req in batch.requests:
            results[req.idx] = answer = self.pipeline.answer(req)
            if req.idx in self.batch_explain.targets:
                try:
                    self._add_explanations(req, answer)
                except Exception as e:
                    batch.failures.add_exception(req.idx, e)
        failed = len(batch.failures)
        self.batch_metrics.count(requests=batch.n_requests - failed, failed=failed,
                                 faces=sum(req.found for req in batch.requests))
        self.batch_metrics.emit()
        return batch.failures.apply(self.context, results)

    def _add_explanations(self, req: VideoRequest, answer: dict[str, Any]) -> None:
        """Each person's weightiest frames and maps into ``answer`` (``people``, or the top level
        when no face was found: the whole frames)."""
        target = self.batch_explain.targets[req.idx]
        tracked = [p for p in req.people if p.track is not None]
        if not tracked:
            answer["explanation"] = self.explain_person(req, req.people[0], target)
            return
        for entry, person in zip(answer["people"], tracked):
            entry["explanation"] = self.explain_person(req, person, target)
