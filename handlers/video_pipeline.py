"""From an encoded video to per-person answers: sampling, keyframe tracking, alignment, pooling.

Shared by the video handler (a batch of requests, one forward pass) and ``training.evaluate
--task video`` (the same steps on labelled files), so that what is measured is what is served.

Per video: sample frames (a per-frame model: ``sample_fps`` per second, at least ``clip_len``, at
most ``max_sampled``; a clip model: ``clip_len`` frames over the whole video and ``clip_len`` in
each timeline window), decode them in one pass (``video_decode.read_clip``), detect faces on
keyframes only and track them between (``video_track``), align each tracked face on each frame.
Each person is one track; the main person (the most present) answers for the whole video. With
no face anywhere the whole frames are classified. A per-frame model scores every crop once and
each clip's answer is pooled from its frames (``video_pool``); a clip model scores stacked clips.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import torch
from PIL import Image

try:  # inside the repository (package import)
    from . import common, faces, preprocess, video_decode, video_pool
    from .contract import DETECTION_MODES, VIDEO_DEFAULTS
    from .video_batch import Person, VideoBatch, VideoRequest
    from .video_track import KeyframeTracker
except ImportError:  # inside a .mar the shared modules sit flat beside the handler
    import common  # type: ignore[no-redef]
    from contract import DETECTION_MODES, VIDEO_DEFAULTS  # type: ignore[no-redef]
    import faces  # type: ignore[no-redef]
    import preprocess  # type: ignore[no-redef]
    import video_decode  # type: ignore[no-redef]
    import video_pool  # type: ignore[no-redef]
    from video_batch import Person, VideoBatch, VideoRequest  # type: ignore[no-redef]
    from video_track import KeyframeTracker  # type: ignore[no-redef]

logger = logging.getLogger(__name__)


def is_frame_model(spec: Mapping[str, Any]) -> bool:
    """A video spec whose network scores single frames (pooled here) rather than whole clips."""
    return bool((spec.get("extra") or {}).get("frame_model"))


class VideoPipeline:
    """The steps of one video request, configured by the model's spec and the handler options
    (``contract.VIDEO_DEFAULTS`` where ``options`` leaves one out)."""

    def __init__(self, spec: Mapping[str, Any], options: Mapping[str, Any],
                 detector: faces.Detector | None) -> None:
        o = {**VIDEO_DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
        self.spec = dict(spec)
        self.labels = list(spec["labels"])
        self.topk = int(o["topk"])
        self.limits = video_decode.VideoLimits.from_mapping(options)
        self.window_seconds = float(o["window_seconds"])
        self.window_stride = float(o["window_stride"] or self.window_seconds)
        self.max_windows = max(1, int(o["max_windows"]))
        self.detection = str(o["detection"])
        if self.detection not in DETECTION_MODES:
            raise ValueError(f"detection must be one of {DETECTION_MODES}, not {self.detection!r}")
        if self.detection != "never" and detector is None:
            raise ValueError(f"detection {self.detection!r} needs a face detector")
        self.detector = detector
        self.keyframe_every, self.refine = max(1, int(o["keyframe_every"])), max(0, int(o["refine"]))
        self.max_people = max(1, int(o["max_people"]))
        self.frame_model = is_frame_model(spec)
        extra = spec.get("extra") or {}
        self.clip_len = int(spec["clip_len"])
        self.sample_fps = float(extra.get("sample_fps", 0) or 0)
        self.max_sampled = int(extra.get("max_sampled", 0) or 4 * self.clip_len)
        self.pooling, self.pool_params = video_pool.pooling_from_spec(spec)
        if o["pooling"]:
            video_pool.check_pooling(str(o["pooling"]))
            self.pooling = str(o["pooling"])
        self.size, self.channels = int(spec["input_size"]), int(spec["channels"])
        self.margin = spec.get("face_margin")
        self.pil_mode = "L" if self.channels == 1 else "RGB"
        self.time_dim = self._time_dim(spec)

    # --- planning and decoding -----------------------------------------------------------------
    @staticmethod
    def _time_dim(spec: Mapping[str, Any]) -> int:
        """Where time sits in a clip model's input: 1 for ``(C, T, S, S)`` (default), 0 for ``(T, C, S, S)``."""
        shape = list((spec.get("extra") or {}).get("input_shape") or [])
        c, t = int(spec["channels"]), int(spec["clip_len"])
        if len(shape) == 4 and shape[0] == t and shape[1] == c and shape[0] != shape[1]:
            return 0
        return 1

    def input_shape(self) -> tuple[int, ...]:
        """One model input without the batch dimension: a frame, or a clip."""
        c, s = self.channels, self.size
        if self.frame_model:
            return (c, s, s)
        return (c, self.clip_len, s, s) if self.time_dim == 1 else (self.clip_len, c, s, s)

    def plan(self, info: video_decode.VideoInfo) -> tuple[list[int], list[video_decode.Window], list[list[int]]]:
        """The frames to sample, the timeline windows and each clip's frames (overall first)."""
        wins: list[video_decode.Window] = []
        if info.duration > self.window_seconds + 1e-6:
            span = info.duration - self.window_seconds
            stride = max(self.window_stride, span / max(self.max_windows - 1, 1))
            wins = video_decode.windows(info.timestamps, self.window_seconds, stride, self.clip_len,
                                        duration=info.duration)[: self.max_windows]
        if not self.frame_model:
            clips = [video_decode.sample_indices(info.n_frames, self.clip_len)] + [w.indices for w in wins]
            return sorted({i for c in clips for i in c}), wins, clips
        sampled = sorted(set(video_decode.sample_at_rate(info, self.sample_fps, self.clip_len, self.max_sampled)))
        clips = [sampled] + [self._in_window(sampled, info.timestamps, w) for w in wins]
        return sampled, wins, clips

    @staticmethod
    def _in_window(sampled: Sequence[int], times: Sequence[float], w: video_decode.Window) -> list[int]:
        """The sampled frames shown during window ``w`` (the one nearest its middle if none)."""
        t0 = times[0]
        inside = [i for i in sampled if w.start - 1e-9 <= times[i] - t0 < w.end - 1e-9]
        if inside:
            return inside
        mid = (w.start + w.end) / 2
        return [min(sampled, key=lambda i: abs(times[i] - t0 - mid))]

    def read(self, idx: int, data: video_decode.VideoSource) -> VideoRequest:
        """Probe within the limits, plan, decode the sampled frames in one pass."""
        plan: dict[str, Any] = {}

        def frames_for(info: video_decode.VideoInfo) -> list[int]:
            plan["sampled"], plan["windows"], plan["clips"] = self.plan(info)
            return plan["sampled"]

        video = video_decode.read_clip(data, frames_for, self.limits)
        req = VideoRequest(idx, video.info, plan["sampled"], plan["windows"], plan["clips"],
                           frames=dict(zip(video.indices, video.frames)))
        if self._wants_detection(req):
            req.tracker = KeyframeTracker(req.sampled, every=self.keyframe_every, refine=self.refine)
        return req

    def _wants_detection(self, req: VideoRequest) -> bool:
        if self.detection == "never":
            return False
        return self.detection == "always" or max(req.info.width, req.info.height) > faces.TIGHT_MAX_SIDE

    # --- faces ----------------------------------------------------------------------------------
    def track(self, batch: VideoBatch) -> int:
        """Detect on keyframes (all requests' frames of a round in one detector call) and track;
        returns the number of frames detected. A request whose frames break the detector fails alone."""
        n = 0
        while True:
            todo = [(req, i) for req in batch.requests if req.tracker and req.idx not in batch.failures
                    for i in req.tracker.pending()]
            if not todo:
                return n
            n += len(todo)
            try:
                found = self.detector.detect([req.frames[i] for req, i in todo])
            except Exception:
                logger.exception("face detection failed on the batch; retrying per request")
                found = self._detect_per_request(batch, todo)
            for (req, i), f in zip(todo, found):
                if req.tracker is not None:
                    req.tracker.add(i, f)

    def _detect_per_request(self, batch: VideoBatch, todo: list[tuple[VideoRequest, int]]) -> list[list[faces.Face]]:
        """Detection request by request; a request that still fails is marked failed and stops tracking."""
        got: dict[tuple[int, int], list[faces.Face]] = {}
        for req in {id(r): r for r, _ in todo}.values():
            mine = [i for r, i in todo if r is req]
            try:
                got.update(((req.idx, i), f) for i, f in zip(mine, self.detector.detect([req.frames[i] for i in mine])))
            except Exception as e:
                batch.failures.add_exception(req.idx, e)
                req.tracker = None
        return [got.get((r.idx, i), []) for r, i in todo]

    def people(self, req: VideoRequest) -> None:
        """Each person's model inputs and clips; the decoded frames are released afterwards."""
        tracks = req.tracker.tracks()[: self.max_people] if req.tracker else []
        converted: dict[int, Image.Image] = {}

        def frame(i: int) -> Image.Image:
            if i not in converted:
                converted[i] = req.frames[i].convert(self.pil_mode)
            return converted[i]

        if not tracks:  # no face anywhere: the whole frames
            p = Person(None)
            for i in req.sampled:
                p.crops[i] = preprocess.to_model_input(frame(i), self.spec)
            self._clips(req, p, main=True)
            req.people = [p]
        else:
            req.people = []
            for k, t in enumerate(tracks):
                p = Person(t, found=len(t.faces))
                frames_of = req.sampled if k == 0 else sorted(t.faces)
                for i in frames_of:
                    face = t.faces.get(i) or t.faces[min(t.faces, key=lambda j: (abs(j - i), j))]
                    if self.detection == "auto" and faces.is_tight_crop(req.frames[i], [face]):
                        crop = frame(i)  # a face crop already: classified whole, as the image handler does
                    else:  # converted to the model's mode around the face only
                        crop = faces.align_face(req.frames[i], face, self.size, self.margin, mode=self.pil_mode)
                    p.crops[i] = preprocess.to_model_input(crop, self.spec)
                self._clips(req, p, main=k == 0)
                req.people.append(p)
        req.frames.clear()
        converted.clear()

    def _clips(self, req: VideoRequest, p: Person, main: bool) -> None:
        """The person's clips: the main person's are the request's; another person's are cut to
        the frames where they are (windows they do not appear in are left out)."""
        if main:
            p.clips, p.windows = [list(c) for c in req.clips], list(req.windows)
            return
        have = sorted(p.crops)
        p.clips = [have if self.frame_model else [self._nearest(have, i) for i in req.clips[0]]]
        for w, c in zip(req.windows, req.clips[1:]):
            mine = [i for i in c if i in p.crops]
            if not mine:
                continue
            p.clips.append(mine if self.frame_model else [self._nearest(have, i) for i in c])
            p.windows.append(w)

    @staticmethod
    def _nearest(have: Sequence[int], i: int) -> int:
        return min(have, key=lambda j: (abs(j - i), j))

    # --- model inputs and answers ---------------------------------------------------------------
    def inputs(self, reqs: Sequence[VideoRequest]) -> torch.Tensor | None:
        """Every model input of the requests as one batch: each person's crops (a per-frame
        model) or each person's clips (a clip model)."""
        items: list[torch.Tensor] = []
        for req in reqs:
            for p in req.people:
                if self.frame_model:
                    items.extend(p.crops[i] for i in sorted(p.crops))
                else:
                    items.extend(torch.stack([p.crops[i] for i in c], dim=self.time_dim) for c in p.clips)
        return torch.stack(items) if items else None

    def assign(self, reqs: Sequence[VideoRequest], probs: torch.Tensor) -> None:
        """Spread the model's probabilities (rows in :meth:`inputs` order) back over each person's clips."""
        pos = 0
        for req in reqs:
            for p in req.people:
                if self.frame_model:
                    order = sorted(p.crops)
                    p.frame_probs = dict(zip(order, probs[pos:pos + len(order)]))
                    pos += len(order)
                    p.probs = [self.pool(torch.stack([p.frame_probs[i] for i in c])) for c in p.clips]
                else:
                    p.probs = list(probs[pos:pos + len(p.clips)])
                    pos += len(p.clips)
        if pos != len(probs):
            raise RuntimeError(f"{len(probs)} model outputs for {pos} inputs")

    def pool(self, frame_probs: torch.Tensor, method: str | None = None) -> torch.Tensor:
        """``(T, K)`` frame probabilities → the clip's ``(K,)`` by this pipeline's pooling (or ``method``)."""
        return video_pool.pool(frame_probs, self.labels, method or self.pooling, self.pool_params)

    def answer(self, req: VideoRequest) -> dict[str, Any]:
        """The JSON answer: the main person's top-k and timeline, and every tracked person's."""
        key = f"top{self.topk}"
        info, main = req.info, req.people[0]
        out: dict[str, Any] = {
            key: common.topk(main.probs[0].tolist(), self.labels, self.topk),
            "duration": round(info.duration, 3), "frames": info.n_frames, "fps": round(info.fps, 3),
            "faces": {"found_frames": req.found, "sampled_frames": len(req.sampled),
                      "whole_frame": main.track is None,
                      "detected_frames": req.tracker.detected_frames() if req.tracker else 0},
        }
        if req.windows:
            out["timeline"] = self._timeline(main)
        people = [p for p in req.people if p.track is not None]
        if people:
            times = info.timestamps
            out["people"] = []
            for p in people:
                t = p.track
                entry: dict[str, Any] = {
                    "id": t.id, "box": [round(v, 1) for v in t.mean_box()],
                    "start": round(times[t.first] - times[0], 3), "end": round(times[t.last] - times[0], 3),
                    "found_frames": p.found, "detected_frames": len(t.detected),
                    key: common.topk(p.probs[0].tolist(), self.labels, self.topk)}
                if req.windows:
                    entry["timeline"] = self._timeline(p)
                out["people"].append(entry)
        return out

    def _timeline(self, p: Person) -> list[dict[str, Any]]:
        key = f"top{self.topk}"
        return [{"start": round(w.start, 3), "end": round(w.end, 3),
                 key: common.topk(row.tolist(), self.labels, self.topk)} for w, row in zip(p.windows, p.probs[1:])]


def run_one(pipeline: VideoPipeline, data: video_decode.VideoSource,
            score: Callable[[torch.Tensor], torch.Tensor]) -> VideoRequest:
    """One video through the pipeline with ``score`` (model inputs → probabilities); raises on bad input."""
    batch = VideoBatch(1)
    batch.requests.append(pipeline.read(0, data))
    pipeline.track(batch)
    if 0 in batch.failures:
        raise preprocess.InputError(batch.failures.by_index[0]["message"], batch.failures.by_index[0]["code"])
    req = batch.requests[0]
    pipeline.people(req)
    x = pipeline.inputs([req])
    pipeline.assign([req], score(x))
    return req
