"""The service's steps in this process, for ``demo.annotate``: the same face detection,
alignment, preprocessing, video pipeline and networks as the handlers, on the checkpoints
in ``pretrain/`` (no TorchServe, no TorchScript).

Answers carry all seven probabilities (``model_defs.LABELS`` order), not only the top 3, and, when
asked, each face's explanation as the explanations API gives it (``handlers.explain``, the
image handler's method and grid from ``handlers.contract.IMAGE_DEFAULTS``).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from handlers import explain as explain_ops
from handlers import faces as face_ops
from handlers import preprocess
from handlers.contract import IMAGE_DEFAULTS, VIDEO_DEFAULTS
from handlers.video_decode import VideoInfo
from handlers.video_pipeline import VideoPipeline, run_one
from handlers.video_track import interpolate
from model_defs import inference_model, load_model

log = logging.getLogger(__name__)


@dataclass
class FaceResult:
    """One face of a photo (or the whole photo, ``detected`` False) and its probabilities."""

    box: list[float]  # [x1, y1, x2, y2] in the photo's pixels
    detected: bool
    probs: list[float]  # per label, in the model's label order
    explanation: Explanation | None = None  # when asked for


@dataclass
class Explanation:
    """A face's map for one label (``handlers.explain``): where in its model crop the model looked."""

    label: int  # index into the labels
    map: torch.Tensor  # (grid, grid) in [0, 1], rows from the crop's top
    corners: list[list[float]]  # the crop's top-left, top-right, bottom-right, bottom-left in the photo
    crop: Image.Image  # the crop the model saw (aligned face, or the whole photo)


@dataclass
class PersonResult:
    """One tracked person of a video (``faces`` empty: no face anywhere, the whole frames)."""

    id: int
    faces: dict[int, face_ops.Face]  # sampled frame index -> face (detected or interpolated)
    windows: list[tuple[float, float]]  # the timeline windows this person has an answer for
    overall: list[float]  # probabilities for the whole video
    timeline: list[list[float]]  # probabilities per window

    def face_at(self, frame: int) -> face_ops.Face | None:
        """The face at any frame of the person's span, interpolated between sampled frames."""
        if not self.faces or frame < min(self.faces) or frame > max(self.faces):
            return None
        if frame in self.faces:
            return self.faces[frame]
        before = max(i for i in self.faces if i < frame)
        after = min(i for i in self.faces if i > frame)
        return interpolate(self.faces[before], self.faces[after], (frame - before) / (after - before))

    def probs_at(self, t: float) -> list[float]:
        """The probabilities of the window holding time ``t`` (the one whose middle is nearest),
        or the whole video's."""
        best, best_d = None, float("inf")
        for (start, end), probs in zip(self.windows, self.timeline):
            d = abs((start + end) / 2 - t)
            if start - 1e-6 <= t <= end + 1e-6 and d < best_d:
                best, best_d = probs, d
        return best if best is not None else self.overall


@dataclass
class VideoResult:
    """A video's people, the main (most present) one first."""

    info: VideoInfo
    people: list[PersonResult] = field(default_factory=list)

    @property
    def main(self) -> PersonResult:
        return self.people[0]


class Recognizer:
    """The image and video networks and the face detector, loaded once."""

    def __init__(self, image_weights: str | os.PathLike | None, video_weights: str | os.PathLike | None,
                 detection: str = "auto", device: str = "cpu", detector: str = str(IMAGE_DEFAULTS["detector"])) -> None:
        if detection not in ("auto", "always", "never"):
            raise ValueError(f"detection must be auto, always or never, not {detection!r}")
        self.detection, self.detector = detection, detector
        self._detectors: dict[str, face_ops.Detector] = {}  # per task, loaded on first use
        self.device = torch.device(device)
        self._paths = {"image": image_weights, "video": video_weights}
        self._models: dict[str, tuple[torch.nn.Module, dict]] = {}

    @property
    def labels(self) -> list[str]:
        """The label order of the probabilities (the image model's; the video model's is the same)."""
        task = "image" if self._paths["image"] else "video"
        return list(self._model(task)[1]["labels"])

    def _detector(self, task: str, options: dict, max_faces: int) -> face_ops.Detector:
        """The task's face detector as its handler configures it (``self.detector`` chosen)."""
        if task not in self._detectors:
            self._detectors[task] = face_ops.detector_for({**options, "detector": self.detector}, self.device,
                                                          max_faces=max_faces)
        return self._detectors[task]

    def _model(self, task: str) -> tuple[torch.nn.Module, dict]:
        if task not in self._models:
            path = self._paths[task]
            if not path or not Path(path).is_file():
                raise FileNotFoundError(f"no {task} weights: {path} (pass --{task}-weights)")
            net = load_model(path, map_location=self.device)
            spec = net.spec.to_dict()
            if spec.get("task", task) != task:
                raise ValueError(f"{path} holds a {spec.get('task')} model, not a {task} model")
            self._models[task] = (inference_model(net).to(self.device).eval(), spec)
            log.info("loaded %s model %s from %s", task, spec.get("arch"), path)
        return self._models[task]

    @torch.inference_mode()
    def _score(self, task: str, x: torch.Tensor) -> torch.Tensor:
        model, _ = self._model(task)
        return torch.softmax(model(x.to(self.device)).float(), dim=-1).cpu()

    def image(self, img: Image.Image, explain: bool = False) -> list[FaceResult]:
        """Every face of a decoded photo, largest first, as the image handler finds them; with
        ``explain``, each with the map of its top label, as ``POST /explanations`` answers."""
        _, spec = self._model("image")
        detector = None
        if self.detection != "never":
            detector = self._detector("image", IMAGE_DEFAULTS, int(IMAGE_DEFAULTS["max_faces"]))
        margin = spec.get("face_margin")  # None/0: faces.DEFAULT_MARGIN
        crops = face_ops.faces_for_images([img], detector, self.detection, int(spec["input_size"]), margin,
                                          int(spec["channels"]))[0]
        if not crops:
            return []
        x = torch.stack([preprocess.to_model_input(c.image, spec) for c in crops])
        probs = self._score("image", x)
        results = [FaceResult(list(c.box), c.detected, row.tolist()) for c, row in zip(crops, probs)]
        if explain:
            model, _ = self._model("image")
            target = probs.argmax(1)
            maps = explain_ops.attribute(model, x.to(self.device), target.to(self.device),
                                         str(IMAGE_DEFAULTS["explain_method"]), int(IMAGE_DEFAULTS["explain_grid"]))
            for r, c, label, cell_map in zip(results, crops, target.tolist(), maps):
                r.explanation = Explanation(label, cell_map, explain_ops.crop_corners(
                    c.face, c.box, int(spec["input_size"]), margin), c.image)
        return results

    def video(self, data: bytes | str | os.PathLike) -> VideoResult:
        """A video through the video handler's pipeline (sampling, keyframe tracking, windows)."""
        _, spec = self._model("video")
        options = {**VIDEO_DEFAULTS, "detection": self.detection}
        detector = None
        if self.detection != "never":
            detector = self._detector("video", options, int(options["max_people"]))
        pipeline = VideoPipeline(spec, options, detector)
        req = run_one(pipeline, data, lambda x: self._score("video", x))
        result = VideoResult(req.info)
        for k, p in enumerate(req.people):
            probs = [row.tolist() for row in p.probs]
            result.people.append(PersonResult(
                id=p.track.id if p.track is not None else k, faces=dict(p.track.faces) if p.track else {},
                windows=[(w.start, w.end) for w in p.windows], overall=probs[0], timeline=probs[1:]))
        return result


def top(probs: Sequence[float], labels: Sequence[str], k: int = 3) -> list[tuple[str, float]]:
    """The ``k`` most probable ``(label, probability)``, most probable first."""
    order = sorted(range(len(probs)), key=lambda i: probs[i], reverse=True)[:k]
    return [(labels[i], float(probs[i])) for i in order]
