"""TorchServe handler for the image model: encoded image(s) in, per-face top-3 emotions out.

Faces are found by the configured detector (``detector``: retinaface, the default, or mtcnn;
all images of a TorchServe batch in one detector call) and aligned to the model's crop layout (``handlers.faces``, the
same code as ``training.evaluate --detect-faces``). Response per request::

    {"faces": [{"box": [x1, y1, x2, y2], "detected": true, "score": 0.999,
                "landmarks": [[x, y] * 5], "top3": [{"label", "probability"}, ...]}, ...],
     "detection": {"mode": "auto", "faces_detected": 2, "whole_image": false}}

``faces`` is sorted by face size, largest first; boxes and landmarks are in the original
image's pixels (after EXIF orientation). An entry for the whole image (``detected`` false, box
``[0, 0, width, height]``, no ``score``/``landmarks``) is given in mode ``never``, and in mode
``auto`` when the input is already a tight face crop or no face was found. In mode ``always``
an image without a face gets ``{"faces": [], "detection": {..., "faces_detected": 0}}`` (200).

Options, from ``model-config.yaml``'s ``handler:`` section over the defaults in
``handlers/contract.py`` (``IMAGE_DEFAULTS``, which the archive's YAML is written from):
``detection`` (auto | always | never), ``detector`` (retinaface | mtcnn), ``min_face_size`` (pixels), ``max_faces`` (per image),
``detect_max_side`` (photos are downscaled to it for detection), ``max_pixels`` (larger images
are answered 413), ``topk``, ``threads``, ``optimize`` (the CPU graph: onednn | mkldnn | off) and ``half``
(float16 autocast on GPU; each kept only if it gives the plain model's output).
Per request, ``detection`` and ``max_faces`` (at most the configured one) may be sent as
multipart form fields beside the image, JSON fields beside the base64 image, or gRPC
``input`` entries; a bad value is answered 400.
(URL query parameters did not reach the handler with a raw body in TorchServe 0.12.)

A request that cannot be used gets its own 4xx and ``{"code", "type", "message"}`` while the
rest of the batch is answered.

``POST /explanations/emotion_image`` (TorchServe sets the request header ``explain``), or a
request that sends ``explain=true`` like the options above (gRPC: TorchServe 0.12 has no
``Explanations`` RPC), answers the same, plus per face an ``explanation`` of its top label (or of
``target``, a label sent like the options): ``{"label", "method", "grid", "map": grid x grid
floats in [0, 1], rows from the crop's top, "corners": the crop's top-left, top-right,
bottom-right and bottom-left corners in the image's pixels}`` (``handlers/explain.py``; options
``explain_method`` and ``explain_grid``). Explanation and prediction requests may share a batch.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Mapping

import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

try:  # inside the repository (package import)
    from . import common, cpu_graph, explain, faces, preprocess
    from . import metrics as handler_metrics
    from .contract import DETECTION_MODES
except ImportError:  # inside a .mar the shared modules sit flat beside the handler
    import common  # type: ignore[no-redef]
    import cpu_graph  # type: ignore[no-redef]
    import explain  # type: ignore[no-redef]
    import faces  # type: ignore[no-redef]
    from contract import DETECTION_MODES  # type: ignore[no-redef]
    import metrics as handler_metrics  # type: ignore[no-redef]
    import preprocess  # type: ignore[no-redef]

logger = logging.getLogger(__name__)


# TorchServe loads the one class defined in this module: helpers here are functions and tuples.
RequestOptions = tuple[str, int]  # (detection mode, max_faces), validated
# (CropBatch, per request the extras of each crop, per request its "detection" note)
ImageBatch = tuple[common.CropBatch, list[list[dict[str, Any]]], list[dict[str, Any] | None]]


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def parse_detection(value: Any) -> str:
    """A detection mode (auto | always | never); raises ``InputError(400)``."""
    mode = _text(value).strip().lower()
    if mode not in DETECTION_MODES:
        raise preprocess.InputError(f"detection must be one of {', '.join(DETECTION_MODES)}, "
                                    f"not {_text(value)[:40]!r}", 400)
    return mode


def parse_max_faces(value: Any, limit: int) -> int:
    """A face count from 1 to ``limit``; raises ``InputError(400)``."""
    try:
        if isinstance(value, bool) or isinstance(value, float):
            raise ValueError
        n = int(_text(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        n = None
    if n is None or not 1 <= n <= limit:
        raise preprocess.InputError(f"max_faces must be an integer from 1 to {limit}, "
                                    f"not {_text(value)[:40]!r}", 400)
    return n


class EmotionImageHandler(BaseHandler):
    """Batched face detection, alignment and emotion recognition on the archive's model."""

    def initialize(self, context: Any) -> None:
        """Load the TorchScript model and its spec; choose device and thread count; detector."""
        self.context = context
        self.manifest = context.manifest
        options = common.handler_options(context, "image")
        self.topk = int(options["topk"])
        self.detection = parse_detection(options["detection"])
        self.detector_options = options
        self.min_face_size = int(options["min_face_size"])
        self.max_faces = int(options["max_faces"])
        self.max_pixels = int(options["max_pixels"])
        if self.min_face_size < 1 or self.max_faces < 1:
            raise ValueError(f"handler options: min_face_size {self.min_face_size} and "
                             f"max_faces {self.max_faces} must be positive")
        self.device = common.select_device(context, options)
        self.model, self.spec = common.load_scripted_model(context, self.device)
        self.labels = list(self.spec["labels"])
        self.input_size = int(self.spec["input_size"])
        self.channels = int(self.spec["channels"])
        example = torch.randn(2, self.channels, self.input_size, self.input_size,
                              generator=torch.Generator().manual_seed(0)).to(self.device)
        # handlers/cpu_graph.py: the faster CPU graph in use ("off" on a GPU or when none is)
        self.model, self.cpu_graph = cpu_graph.optimize_for_cpu(
            self.model, example, lambda: common.load_scripted_model(context, self.device)[0], options["optimize"])
        self.optimized = self.cpu_graph != "off"
        # explanations: on this graph (occlusion), or on a plain copy for a gradient method
        self.explainer = explain.Explainer(options, self.model, self.optimized,
                                           lambda: common.load_scripted_model(context, self.device)[0])
        self.half = (self.device.type == "cuda" and bool(options["half"])
                     and self._half_matches(example))
        self.face_margin = self.spec.get("face_margin")  # None/0: faces.DEFAULT_MARGIN
        self._detector: faces.Detector | None = None
        if self.detection != "never":  # fail at start-up, not on the first request
            self.detector()
        self._warm_up()
        self.batch_metrics = handler_metrics.BatchMetrics(None)  # replaced per batch
        self.batch_explain = explain.BatchExplanations()  # likewise
        self.initialized = True
        logger.info("loaded %s (%s) on %s, %d threads, CPU graph %s, float16 %s; detection %s (%s), "
                    "min face %d px, max %d faces; explanations %s %dx%d", self.manifest["model"]["serializedFile"],
                    self.spec.get("arch"), self.device, torch.get_num_threads(), self.cpu_graph, self.half,
                    self.detection, options["detector"], self.min_face_size, self.max_faces, self.explainer.method,
                    self.explainer.grid, self.explainer.grid)

    def detector(self) -> faces.Detector:
        """The configured face detector on the worker's device (created on first use)."""
        if self._detector is None:
            self._detector = faces.detector_for(self.detector_options, self.device)
        return self._detector

    def _half_matches(self, example: torch.Tensor, atol: float = 2e-2) -> bool:
        """Whether float16 autocast (GPU) gives the float32 probabilities on ``example``;
        autocast is used only then."""
        try:
            with torch.inference_mode():
                want = torch.softmax(self.model(example).float(), dim=1)
                with torch.autocast("cuda", dtype=torch.float16):
                    got = torch.softmax(self.model(example).float(), dim=1)
            if got.shape == want.shape and torch.allclose(got, want, atol=atol):
                return True
            logger.warning("float16 autocast changes the output (max abs diff %.3g): float32 used",
                           (got - want).abs().max().item())
        except Exception as e:  # an optimisation only
            logger.warning("float16 autocast failed (%s): float32 used", e)
        return False

    def _warm_up(self) -> None:
        c, s = self.channels, self.input_size
        with torch.inference_mode():
            out = self.model(torch.zeros(1, c, s, s, device=self.device))
        if tuple(out.shape) != (1, len(self.labels)):
            raise RuntimeError(f"model output shape {tuple(out.shape)}, expected (1, {len(self.labels)})")

    def request_options(self, row: Any, sources: list[Mapping[str, Any]] | None = None) -> RequestOptions:
        """This request's ``detection`` and ``max_faces`` (configured values by default);
        ``sources``: ``common.option_sources(row)`` when the caller has them already."""
        mode, max_faces = self.detection, self.max_faces
        for source in common.option_sources(row) if sources is None else sources:
            if source.get("detection") is not None:
                mode = parse_detection(source["detection"])
            if source.get("max_faces") is not None:
                max_faces = parse_max_faces(source["max_faces"], self.max_faces)
        return mode, max_faces

    def face_crops(self, images: list[Image.Image], mode: str) -> list[list[faces.FaceCrop] | Exception]:
        """Per image, its crops (``faces.faces_for_images``, one detection pass for all images);
        an image whose detection fails gets the exception instead, the others are kept."""
        detector = self.detector() if mode != "never" else None
        args = (mode, self.input_size, self.face_margin, self.channels)
        try:
            return list(faces.faces_for_images(images, detector, *args))
        except Exception as e:  # find the image that broke it: retry one by one
            if len(images) == 1:
                return [e]
            logger.warning("face detection failed on a batch of %d (%s); retrying one by one",
                           len(images), e)
            return [self.face_crops([img], mode)[0] for img in images]

    def preprocess(self, data: list[Any]) -> ImageBatch:
        """Decode every request, detect faces in all images at once, flatten the crops.

        Returns ``(crops, extras, notes)``: the CropBatch, per request the score/landmarks of
        each of its crops, and per request its ``detection`` note (None for a failed request).
        """
        crop_batch = common.CropBatch(len(data))
        # this batch's figures (handlers/metrics.py) and explanation requests; a worker runs one
        # batch at a time
        self.batch_metrics = metrics = handler_metrics.BatchMetrics(self.context)
        self.batch_explain = explaining = explain.BatchExplanations()
        metrics.batch_size = len(data)
        extras: list[list[dict[str, Any]]] = [[] for _ in data]
        notes: list[dict[str, Any] | None] = [None] * len(data)
        failures = crop_batch.failures
        decoded: dict[int, tuple[Image.Image, RequestOptions]] = {}
        for idx, row in enumerate(data):
            try:
                sources = common.option_sources(row)
                opts = self.request_options(row, sources)
                if explain.wants_explanation(self.context, idx, sources):
                    explaining.want(idx, explain.request_target(sources, self.labels))
                with metrics.timed("decode"):
                    image = preprocess.decode_image(common.extract_body(row, ("image", "file")),
                                                    max_pixels=self.max_pixels)
                decoded[idx] = (image, opts)
            except Exception as e:  # one bad request must not fail the batch
                failures.add_exception(idx, e, default_status=400)
        per_request: dict[int, list[faces.FaceCrop] | Exception] = {}
        for mode in DETECTION_MODES:  # one detection pass per mode present (normally one)
            idxs = [i for i, (_, opts) in decoded.items() if opts[0] == mode]
            if idxs:
                with metrics.timed("detect"):  # detection and alignment
                    per_request.update(zip(idxs, self.face_crops([decoded[i][0] for i in idxs], mode)))
        for idx in sorted(per_request):
            crops, (mode, max_faces) = per_request[idx], decoded[idx][1]
            try:
                if isinstance(crops, Exception):
                    raise RuntimeError(f"face detection failed: {crops}") from crops
                crops = crops[:max_faces]
                tensors = [preprocess.to_uint8(c.image, self.spec) for c in crops]  # normalized per batch
            except Exception as e:
                failures.add_exception(idx, e, default_status=500)
                continue
            for crop, tensor in zip(crops, tensors):
                crop_batch.add(idx, crop.box, crop.detected, tensor)
                extras[idx].append(crop.face.to_dict() if crop.face is not None else {})
                if idx in explaining.targets:
                    explaining.corners[idx].append(
                        explain.crop_corners(crop.face, crop.box, self.input_size, self.face_margin))
            n_found = sum(c.detected for c in crops)
            notes[idx] = {"mode": mode, "faces_detected": n_found,
                          "whole_image": n_found == 0 and len(crops) == 1}
        logger.info("batch of %d requests: %d faces, %d failed", len(data), len(crop_batch), len(failures))
        return crop_batch, extras, notes

    def inference(self, batch: ImageBatch, *args: Any, **kwargs: Any) -> tuple[ImageBatch, torch.Tensor]:
        """One forward pass over all crops of the batch; returns probabilities on the CPU."""
        crops = batch[0]
        if len(crops) == 0:
            return batch, torch.empty(0, len(self.labels))
        x = preprocess.normalize(torch.stack(crops.tensors), self.spec)
        half = torch.autocast("cuda", dtype=torch.float16) if self.half else contextlib.nullcontext()
        with self.batch_metrics.timed("inference"), torch.inference_mode(), half:
            if self.device.type == "cuda":
                x = x.pin_memory().to(self.device, non_blocking=True)
            logits = self.model(x)
            probs = torch.softmax(logits.float(), dim=1).cpu()
        if self.batch_explain:  # the explanation requests' faces (none on /predictions)
            self.batch_explain.run(self.explainer, x, probs, [idx for idx, _, _ in crops.owners])
        return batch, probs

    def explain_handle(self, data_preprocess: ImageBatch, raw_data: list[Any]) -> list[Any]:
        """``POST /explanations``: the predictions' answer, each face with its map. ``inference``
        computes the maps of every request that came in as an explanation, so a batch that mixes
        both kinds is answered right whichever kind its first request is (BaseHandler looks at
        that one only)."""
        return self.postprocess(self.inference(data_preprocess))

    def postprocess(self, data: tuple[ImageBatch, torch.Tensor]) -> list[Any]:
        """Exactly one response per request: faces with top-k emotions, or that request's error."""
        (crop_batch, extras, notes), probs = data
        results: list[Any] = []
        for idx, crops in enumerate(crop_batch.split(probs.tolist())):
            entries = []
            maps = self.batch_explain.maps.get(idx, [])
            for k, ((box, detected, row), extra) in enumerate(zip(crops, extras[idx])):
                entry = {"box": box, "detected": detected}
                if extra:
                    entry.update(score=extra["score"], landmarks=extra["landmarks"])
                entry[f"top{self.topk}"] = common.topk(row, self.labels, self.topk)
                if k < len(maps):
                    label, cell_map = maps[k]
                    entry["explanation"] = self.explainer.entry(
                        self.labels[label], cell_map, self.batch_explain.corners[idx][k])
                entries.append(entry)
            answer: dict[str, Any] = {"faces": entries}
            if notes[idx] is not None:
                answer["detection"] = notes[idx]
            results.append(answer)
        failed = len(crop_batch.failures)
        self.batch_metrics.count(requests=len(results) - failed, failed=failed, faces=len(crop_batch))
        self.batch_metrics.emit()
        return crop_batch.failures.apply(self.context, results)
