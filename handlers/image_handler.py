"""TorchServe handler for the image model: encoded image(s) in, per-face top-3 emotions out.

Response per request: ``{"faces": [{"box": [x1, y1, x2, y2], "detected": bool,
"top3": [{"label", "probability"}, ...]}]}``; a request that cannot be used gets its own
4xx and ``{"code", "type", "message"}`` while the rest of the batch is answered.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any

import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

try:  # inside the repository (package import)
    from . import common, preprocess
except ImportError:  # inside a .mar the shared modules sit flat beside the handler
    import common  # type: ignore[no-redef]
    import preprocess  # type: ignore[no-redef]

logger = logging.getLogger(__name__)

SPEC_FILE = "spec.json"


class EmotionImageHandler(BaseHandler):
    """Batched image emotion recognition on the archive's TorchScript model."""

    def initialize(self, context: Any) -> None:
        """Load the TorchScript model and its spec; choose device and thread count."""
        self.context = context
        self.manifest = context.manifest
        props = context.system_properties
        yaml_cfg = getattr(context, "model_yaml_config", None) or {}
        options = yaml_cfg.get("handler") or {}
        self.topk = int(options.get("topk", 3))
        gpu_id = props.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{gpu_id}")
        else:
            self.device = torch.device("cpu")
            threads = int(options.get("threads", 0)) or max(
                1, (os.cpu_count() or 1) // max(1, int(yaml_cfg.get("maxWorkers", 1))))
            torch.set_num_threads(threads)
        model_dir = props["model_dir"]
        path = os.path.join(model_dir, self.manifest["model"]["serializedFile"])
        extra = {SPEC_FILE: ""}
        with warnings.catch_warnings():  # TorchScript's deprecation notice, not actionable here
            warnings.simplefilter("ignore", FutureWarning)
            self.model = torch.jit.load(path, map_location=self.device, _extra_files=extra).eval()
        if not extra[SPEC_FILE]:
            raise RuntimeError(f"{path}: no {SPEC_FILE} inside the TorchScript file")
        self.spec = json.loads(extra[SPEC_FILE])
        self.labels = list(self.spec["labels"])
        self._warm_up()
        self.initialized = True
        logger.info("loaded %s (%s) on %s, %d threads", path, self.spec.get("arch"), self.device,
                    torch.get_num_threads())

    def _warm_up(self) -> None:
        c, s = int(self.spec["channels"]), int(self.spec["input_size"])
        with torch.inference_mode():
            out = self.model(torch.zeros(1, c, s, s, device=self.device))
        if tuple(out.shape) != (1, len(self.labels)):
            raise RuntimeError(f"model output shape {tuple(out.shape)}, expected (1, {len(self.labels)})")

    def find_faces(self, image: Image.Image) -> list[tuple[list[int], bool, Image.Image]]:
        """Faces in an image as ``(box, detected, crop)``; for now the whole image, undetected."""
        return [([0, 0, image.width, image.height], False, image)]

    def preprocess(self, data: list[Any]) -> common.CropBatch:
        """Decode each request and flatten all its face crops into one batch."""
        batch = common.CropBatch(len(data))
        for idx, row in enumerate(data):
            try:
                image = preprocess.decode_image(common.extract_body(row, ("image", "file")))
                for box, detected, crop in self.find_faces(image):
                    batch.add(idx, box, detected, preprocess.to_model_input(crop, self.spec))
            except Exception as e:  # one bad request must not fail the batch
                batch.failures.add_exception(idx, e, default_status=400)
        logger.info("batch of %d requests: %d faces, %d failed", len(data), len(batch), len(batch.failures))
        return batch

    def inference(self, batch: common.CropBatch, *args: Any, **kwargs: Any) -> tuple[common.CropBatch, torch.Tensor]:
        """One forward pass over all crops of the batch; returns probabilities on the CPU."""
        if len(batch) == 0:
            return batch, torch.empty(0, len(self.labels))
        with torch.inference_mode():
            logits = self.model(torch.stack(batch.tensors).to(self.device))
            probs = torch.softmax(logits.float(), dim=1).cpu()
        return batch, probs

    def postprocess(self, data: tuple[common.CropBatch, torch.Tensor]) -> list[Any]:
        """Exactly one response per request: faces with top-k emotions, or that request's error."""
        batch, probs = data
        results: list[Any] = []
        for faces in batch.split(probs.tolist()):
            results.append({"faces": [
                {"box": box, "detected": detected, f"top{self.topk}": common.topk(row, self.labels, self.topk)}
                for box, detected, row in faces]})
        return batch.failures.apply(self.context, results)
