"""From frames of live sequences to per-person answers: the steps of the live handler and the SDK.

Shared by ``live_handler`` (a batch of frames from several sequences, one forward pass) and
``training.sdk.EmotionRecognizer.recognize_stream`` (one sequence, in process), so that both keep
the same state the same way (``live_state``)::

    engine = LiveEngine(spec, options, detector)
    frames = [engine.frame(idx, seq_id, image, sent_time, end) for ...]   # InputError per bad one
    engine.detect(frames, failures)        # the keyframes of the batch in one detector call
    engine.follow(frames, failures)        # track, crop: each frame's model inputs in frame.crops
    probs = score(torch.stack([c for f in frames for c in f.crops]))
    answers = engine.answers(frames, probs)

Faces are cut as the video model cuts them (``video_pipeline.VideoPipeline``: the spec's crop
size, margin and channels) and pooled with its pooling (``video_pool``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from PIL import Image

try:  # inside the repository (package import)
    from . import common, faces, preprocess, video_pipeline
    from .live_state import LiveLimits, LiveSequence, Person, SequenceStore
except ImportError:  # inside a .mar the shared modules sit flat beside the handler
    import common  # type: ignore[no-redef]
    import faces  # type: ignore[no-redef]
    import preprocess  # type: ignore[no-redef]
    import video_pipeline  # type: ignore[no-redef]
    from live_state import LiveLimits, LiveSequence, Person, SequenceStore  # type: ignore[no-redef]

logger = logging.getLogger(__name__)


@dataclass
class LiveFrame:
    """One frame of one sequence on its way through the engine."""

    idx: int  # its place in the batch
    seq: LiveSequence
    new: bool  # the sequence started with this frame
    end: bool  # the sequence closes after it
    image: Image.Image | None  # None: a request that only closes its sequence
    sent: float | None  # the client's time of the frame, seconds
    found: list[faces.Face] | None = None  # the detector's faces (None: not a keyframe)
    people: list[Person] = field(default_factory=list)
    time: float | None = None
    crops: list[torch.Tensor] = field(default_factory=list)


class LiveEngine:
    """The live steps, configured by the per-frame video spec and the live handler options."""

    def __init__(self, spec: Mapping[str, Any], options: Mapping[str, Any],
                 detector: faces.FaceDetector | None) -> None:
        if not video_pipeline.is_frame_model(spec):
            raise ValueError("live streams need a per-frame video model (spec extra.frame_model)")
        self.spec = dict(spec)
        self.detection = str(options["detection"])
        # the video model's crop, spec and pooling, without its clip planning
        self.pipeline = video_pipeline.VideoPipeline(spec, options, detector)
        self.labels, self.topk = self.pipeline.labels, self.pipeline.topk
        self.max_bytes, self.max_pixels = int(options["max_bytes"]), int(options["max_pixels"])
        self.limits = LiveLimits.from_mapping(options)
        self.store = SequenceStore(self.limits)

    # --- reading ---------------------------------------------------------------------------------
    def frame(self, idx: int, seq_id: str, data: bytes | Image.Image | None, sent: float | None = None,
              end: bool = False) -> LiveFrame:
        """A frame of sequence ``seq_id`` (encoded bytes or a decoded image; None only with ``end``);
        raises ``InputError`` (400/413/415, or 429 when the worker holds too many sequences)."""
        seq, new = self.store.get(seq_id)
        image = None
        if isinstance(data, Image.Image):
            image = preprocess.to_rgb(data)
        elif data is not None:
            if len(data) > self.max_bytes:
                raise preprocess.InputError(f"frame too large: {len(data)} bytes (limit {self.max_bytes})", 413)
            image = preprocess.decode_image(data, self.max_pixels)
        elif not end:
            raise preprocess.InputError("no frame: send an encoded image (or close the sequence)", 400)
        return LiveFrame(idx, seq, new, end, image, sent)

    # --- faces -----------------------------------------------------------------------------------
    def whole_frame(self, img: Image.Image) -> bool:
        """Whether the frame is classified whole (``never``, or ``auto`` and a face crop already)."""
        return self.detection == "never" or (self.detection == "auto" and max(img.size) <= faces.TIGHT_MAX_SIDE)

    def detect(self, frames: Sequence[LiveFrame], failures: common.Failures) -> None:
        """The keyframes of ``frames`` through the detector at once (a frame that breaks it fails alone)."""
        todo = []
        for f in frames:
            if f.image is None:
                continue
            if self.whole_frame(f.image):
                f.found = [faces.Face([0.0, 0.0, float(f.image.width), float(f.image.height)], 1.0, [])]
            elif f.seq.wants_detection():
                todo.append(f)
        if not todo:
            return
        detector = self.pipeline.detector
        try:
            found = detector.detect([f.image for f in todo])
        except Exception:
            logger.exception("face detection failed on the batch; retrying per frame")
            found = []
            for f in todo:
                try:
                    found.extend(detector.detect([f.image]))
                except Exception as e:
                    failures.add_exception(f.idx, e)
                    found.append([])
        for f, got in zip(todo, found):
            f.found = list(got)

    def follow(self, frames: Sequence[LiveFrame], failures: common.Failures) -> None:
        """Advance each frame's sequence (track the faces) and cut each visible person's model input."""
        now = time.monotonic()
        for f in frames:
            if f.idx in failures or f.image is None:
                continue
            try:
                f.time = f.seq.frame_time(f.sent, now)
                f.people = f.seq.step(f.found, now)
                frame = f.image.convert(self.pipeline.pil_mode)
                f.crops = [self.face_input(frame, p) for p in f.people]
            except Exception as e:
                failures.add_exception(f.idx, e)
            f.image = None  # frames are not kept

    def face_input(self, frame: Image.Image, person: Person) -> torch.Tensor:
        """``person``'s face on ``frame`` (in the model's mode) as a model input, cut as the video model cuts it."""
        if not person.face.landmarks:  # the whole frame
            return preprocess.to_model_input(frame, self.spec)
        crop = faces.align_face(frame, person.face, self.pipeline.size, self.pipeline.margin)
        return preprocess.to_model_input(crop, self.spec)

    # --- answers ---------------------------------------------------------------------------------
    def answers(self, frames: Sequence[LiveFrame], probs: torch.Tensor) -> dict[int, dict[str, Any]]:
        """Each person's probabilities (rows in crop order) into their history; the answer per
        frame index; closed sequences are freed."""
        out: dict[int, dict[str, Any]] = {}
        pos = 0
        for f in frames:
            for p, row in zip(f.people, probs[pos:pos + len(f.people)]):
                p.add(f.time, row)
            pos += len(f.people)
            out[f.idx] = self.answer(f)
            if f.end:
                self.store.close(f.seq.id)
                out[f.idx]["closed"] = True
        if pos != len(probs):
            raise RuntimeError(f"{len(probs)} model outputs for {pos} faces")
        return out

    def answer(self, f: LiveFrame) -> dict[str, Any]:
        """The JSON answer of one frame (``live_handler``'s docstring)."""
        key = f"top{self.topk}"
        out: dict[str, Any] = {"sequence": f.seq.id, "frame": f.seq.frames, "new": f.new,
                               "keyframe": f.found is not None}
        if f.time is not None:
            out["time"] = round(f.time, 3)
        out["people"] = []
        for p in f.people:
            smooth, how = p.smoothed(self.pipeline.pool, self.limits)
            out["people"].append({
                "id": p.id, "box": [round(v, 1) for v in p.face.box], "frames": p.frames, "smoothing": how,
                key: common.topk(smooth.tolist(), self.labels, self.topk),
                f"frame_{key}": common.topk(p.probs[-1].tolist(), self.labels, self.topk),
                "probabilities": {label: round(float(v), 4) for label, v in zip(self.labels, smooth.tolist())}})
        return out


def run_one(engine: LiveEngine, frame: LiveFrame, score: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
    """One frame through the engine with ``score`` (model inputs → probabilities); raises
    ``InputError`` for a frame that cannot be used (the SDK's stream, in process)."""
    failures = common.Failures()
    engine.detect([frame], failures)
    engine.follow([frame], failures)
    if frame.idx in failures:
        error = failures.by_index[frame.idx]
        raise preprocess.InputError(error["message"], error["code"])
    probs = score(torch.stack(frame.crops)) if frame.crops else torch.empty(0, len(engine.labels))
    return engine.answers([frame], probs)[frame.idx]
