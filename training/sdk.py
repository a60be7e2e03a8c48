"""The Python SDK: recognise emotions in images and clips, evaluate and train, from Python.

    from training import EmotionRecognizer
    r = EmotionRecognizer(video=False)           # the shipped image model
    r.recognize("photo.jpg")                     # class index (face detection + alignment)
    r.predict("photo.jpg")                       # top-3 [(label, probability), ...], calibrated
    r.train(train_loader, test_loader, epochs=5) # fine-tune; best weights in runs/sdk/image/best.pth

A thin face over the one engine (``training.engine.fit`` / ``evaluate``), the model registry and
the checkpoint format: the same networks, weights, preprocessing (``handlers.preprocess``) and
calibration (``model_defs.inference_model``) as ``training.run``, ``training.evaluate`` and the
TorchServe handlers. The seed SDK's names and quirks (``Emotion_Recognize``, ``Video=``,
``origin_*.pth`` weights) live in ``training.seed_sdk``. See ``docs/sdk.md``.

Tensor convention (the seed's): a **float** tensor is what ``transforms.ToTensor()`` gives,
RGB or grey values in ``[0, 1]``, not normalized, of any size; a **uint8** tensor holds pixel
values ``0..255``. Either goes through ``handlers.preprocess.spec_uint8``, the one path that
serving and training use. Images are ``(3, H, W)``; clips are ``(3, T, H, W)``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from handlers.contract import DETECTION_MODES, FACE_DETECTORS, IMAGE_DEFAULTS, LIVE_DEFAULTS
from handlers.faces import Detector, detector_for, largest_face
from handlers.live_engine import LiveEngine, run_one as live_run_one
from handlers.video_pipeline import is_frame_model
from handlers.preprocess import decode_image, normalize, spec_uint8, to_model_input, to_rgb
from handlers.video_decode import read_clip, sample_indices
from model_defs import (DEFAULT_MODEL, LABELS, SHIPPED_WEIGHTS, CheckpointError, ModelSpec, create_model,
                        default_spec, is_checkpoint, list_models, load_file)
from model_defs.video_nets import with_frame_network

from .engine import FitConfig, evaluate_model, fit, predict_logits, setup_distributed
from .labelled_files import label_index
from .sources import LoadOptions, Source, check_best_rule, multi_source_loaders
from .video_task import clip_probs

log = logging.getLogger(__name__)

DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parent.parent / "runs" / "sdk"
"""Training output (TensorBoard logs, checkpoint, best weights) goes to ``<output_dir>/<task>``."""
BEST_NAME = "best.pth"
_RANGE_SLACK = 0.02


class EmotionRecognizer:
    """Recognise, evaluate and train an emotion model from Python.

    Args:
        video: recognise video clips (True, the seed's default) or still images.
        pretrained: start from the shipped weights (``pretrain/emotion_<task>.pth``; a video
            model without video weights gets the image weights in its frame network), else
            random initialisation with a warning. Ignored when ``weights`` is given.
        n_gpu: 0 = CPU, 1 = one CUDA device; more = DistributedDataParallel, one process per
            GPU, started with ``torchrun --nproc-per-node N your_script.py``.
        model: network name from the registry (default ``model_defs.DEFAULT_MODEL[task]``).
        weights: a weights file to start from: our checkpoint format (its spec decides the
            network) or a bare ``state_dict`` of ``model``.
        output_dir: where training writes (default ``runs/sdk``; ``<output_dir>/<task>/``
            holds ``tb/``, ``checkpoint.pth`` and ``best.pth``). Never the shipped weights.
        target_order: the class names of your label numbers 0-6, when they are not
            ``model_defs.LABELS`` order. Targets are mapped on the way in and ``recognize``
            answers in your numbering.
        face_detection: ``auto`` / ``always`` / ``never``, for files and PIL images only
            (tensors are taken as face crops), as in the handler.
        face_detector: ``retinaface`` (the served default) or ``mtcnn``, as the handler's option.
    """

    best_name = BEST_NAME

    def __init__(self, video: bool = True, pretrained: bool = True, n_gpu: int = 0, *, model: str | None = None,
                 weights: str | os.PathLike | None = None, output_dir: str | os.PathLike | None = None,
                 target_order: Sequence[str] | None = None, face_detection: str = "auto",
                 face_detector: str = str(IMAGE_DEFAULTS["detector"])) -> None:
        self.task = "video" if video else "image"
        self.output_dir = Path(output_dir if output_dir is not None else DEFAULT_OUTPUT_DIR) / self.task
        if face_detection not in DETECTION_MODES:
            raise ValueError(f"face_detection must be one of {', '.join(DETECTION_MODES)}, not {face_detection!r}")
        if face_detector not in FACE_DETECTORS:
            raise ValueError(f"face_detector must be one of {', '.join(FACE_DETECTORS)}, not {face_detector!r}")
        self.face_detection, self.face_detector = face_detection, face_detector
        self._to_ours, self._from_ours = _label_maps(target_order)
        self.distributed, self.device = _device(int(n_gpu))
        name = model or DEFAULT_MODEL[self.task]
        if name not in list_models(self.task):
            raise ValueError(f"unknown {self.task} model {name!r}; choose from {list_models(self.task)}")
        if weights is not None:
            log.info("loading weights %s", weights)
            net = model_from_file(Path(weights), name, self.task, strict_arch=model is not None)
        elif pretrained:
            net = self._shipped_model(name)
        else:
            net = create_model(name, default_spec(name))
        self.net: nn.Module = net.to(self.device).eval()
        self.model: nn.Module = self.net
        if self.distributed:
            ids = [self.device] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        self._detector: Detector | None = None

    # ------------------------------------------------------------------ public API

    @property
    def spec(self) -> ModelSpec:
        """The model's spec (input size, channels, mean/std, labels, clip length, calibration)."""
        return self.net.spec

    @property
    def labels(self) -> list[str]:
        """Class names by the index ``recognize`` returns (your ``target_order`` if given)."""
        if self._from_ours is None:
            return list(self.spec.labels)
        return [self.spec.labels[i] for i in self._to_ours]

    @property
    def best_weights(self) -> Path:
        """Where :meth:`train` writes the best epoch's weights."""
        return self.output_dir / self.best_name

    def train(self, train_loader: Iterable, test_loader: Iterable | Mapping[str, Iterable], epochs: int,
              learn_rate: float = 3e-5, momentum: float = 0.9, weight_decay: float = 5e-4,
              best_rule: str = "mean") -> dict[str, Any]:
        """Train or fine-tune on your loaders, evaluating on ``test_loader`` after every epoch.

        Loaders yield ``(input, target)`` batches: images ``(N, 3, H, W)`` or clips
        ``(N, 3, T, H, W)`` (see the module docstring for float/uint8), targets 0-6. Uses
        ``training.engine.fit`` (SGD with momentum, cosine schedule, the engine's batched
        augmentation for images). TensorBoard logs and the per-epoch checkpoint go to
        ``output_dir``; the best epoch's weights to :attr:`best_weights` (the project's
        checkpoint format, loadable by ``model_defs.load_model`` and ``export``), and are loaded
        into this recognizer when training ends.

        ``test_loader`` may be a mapping ``name -> loader`` of several validation sets: each is
        scored every epoch and the best epoch maximises ``best_rule`` over them (``mean``, ``min``
        or one set's name, then any recall floors such as ``"mean,fer2013.neutral>=0.78"``;
        ``training.sources``).

        Returns:
            ``{'acc', 'acc_top3', 'best_epoch'}`` of the best epoch on ``test_loader`` (and
            ``sources``, each validation set's figures, for a mapping).
        """
        cfg = self._fit_config(epochs, learn_rate, momentum, weight_decay, best_rule=best_rule)
        tr = _Batches(self._distributed_loader(train_loader), self._engine_batch, self._target)
        if isinstance(test_loader, Mapping):
            check_best_rule(best_rule, list(test_loader))
            te: Any = {k: _Batches(v, self._engine_batch, self._target) for k, v in test_loader.items()}
        else:
            te = _Batches(test_loader, self._engine_batch, self._target)
        meta = {"sdk": type(self).__name__, "task": self.task, "epochs": int(epochs), "learn_rate": learn_rate,
                "momentum": momentum, "weight_decay": weight_decay}
        return self._fit(tr, te, cfg, meta)

    def train_sources(self, sources: Sequence[Source | str], val_sources: Sequence[Source | str], epochs: int,
                      learn_rate: float = 0.006, *, batch_size: int = 64, class_sampling: str = "none",
                      logit_adjust: float = 0.0, prior_ref: str | None = None, best_rule: str = "mean",
                      momentum: float = 0.9, weight_decay: float = 1e-4, cache: bool = False,
                      workers: int = 2, seed: int = 0) -> dict[str, Any]:
        """Train an image model on several labelled sources at once, as ``training.run --source``.

        ``sources`` and ``val_sources`` are :class:`training.sources.Source` values or their text
        (``"name=folder,weight=0.6,soft=votes.csv"``). Training draws from the sources by weight
        (``class_sampling`` ``none``/``sqrt``/``balanced`` within each), optionally with each
        source's class prior corrected toward ``prior_ref``'s (``logit_adjust`` = tau); every
        validation source is scored each epoch and the best epoch maximises ``best_rule`` (recall
        floors first, as in ``train``).

        Returns:
            ``{'acc', 'acc_top3', 'best_epoch', 'sources'}``: the rule's figures and each
            validation source's at the best epoch.
        """
        if self.task != "image":
            raise ValueError("train_sources trains image models (EmotionRecognizer(video=False))")
        train = [s if isinstance(s, Source) else Source.parse(s) for s in sources]
        val = [s if isinstance(s, Source) else Source.parse(s) for s in val_sources]
        rank, world = (dist.get_rank(), dist.get_world_size()) if self.distributed else (0, 1)
        loaders = multi_source_loaders(train, val, self.spec.to_dict(), LoadOptions(0, seed, cache, workers),
                                       batch_size, class_sampling, logit_adjust, prior_ref, best_rule, rank, world,
                                       self.device.type == "cuda")
        cfg = self._fit_config(epochs, learn_rate, momentum, weight_decay, best_rule=best_rule,
                               logit_adjust=loaders.logit_adjust, warmup_epochs=0.5, label_smoothing=0.0)
        meta = {"sdk": type(self).__name__, "task": self.task, "epochs": int(epochs), "learn_rate": learn_rate,
                "sources": [s.as_dict() for s in train], "val_sources": [s.as_dict() for s in val],
                "class_sampling": class_sampling, "logit_adjust": logit_adjust, "best_rule": best_rule}
        return self._fit(loaders.train, loaders.val, cfg, meta, loaders.class_counts)

    def _fit_config(self, epochs: int, learn_rate: float, momentum: float, weight_decay: float,
                    **more: Any) -> FitConfig:
        return FitConfig(epochs=int(epochs), lr=learn_rate, momentum=momentum, weight_decay=weight_decay,
                         tta_flip=self._tta, output_dir=str(self.output_dir),
                         best_name=str(self.best_weights.resolve()),  # absolute: output_dir / best_name == it
                         **more)

    def _fit(self, train: Iterable, val: Any, cfg: FitConfig, train_args: dict[str, Any],
             class_counts: list[int] | None = None) -> dict[str, Any]:
        """``training.engine.fit``, then the best weights loaded into this recognizer."""
        result = fit(self.model, train, val, cfg, self.device, class_counts, extra_meta={"train_args": train_args})
        if self.distributed:  # rank 0 tracked the best epoch and wrote its weights: share both
            shared = [result]
            dist.broadcast_object_list(shared, src=0)
            result = shared[0]
        best_path = Path(cfg.best_name)
        if best_path.exists():
            self.net.load_state_dict(load_file(best_path)["state_dict"])
        self.net.eval()
        log.info("best epoch %d: acc %.4f; weights in %s", result["best_epoch"], result["acc"], best_path)
        return {k: result[k] for k in ("acc", "acc_top3", "best_epoch", "sources") if k in result}

    def eval(self, test_loader: Iterable, epoch: int = 1) -> dict[str, float]:
        """Evaluate on a loader of ``(input, target)`` batches.

        ``epoch`` only labels the log line (the seed used it for its training record).

        Returns:
            ``{'acc', 'acc_top3'}`` (fractions in [0, 1]).
        """
        res = evaluate_model(self.net, _Batches(test_loader, self._engine_batch, self._target), self.device,
                       self._tta)
        log.info("eval epoch %s: acc %.4f top3 %.4f on %d %ss", epoch, res["acc"], res["acc_top3"],
                 res["n"], "clip" if self.task == "video" else "image")
        return {"acc": res["acc"], "acc_top3": res["acc_top3"]}

    def recognize(self, x: Any) -> int | list[int]:
        """The class index of one input, or a list of them for a batch.

        Accepts an image tensor ``(3, H, W)`` (the seed's ``[3, 100, 100]``) or a batch
        ``(N, 3, H, W)``; for a video model a clip ``(3, T, H, W)`` (the seed's
        ``[3, 16, 224, 224]``) or ``(N, 3, T, H, W)``. Other sizes, grey inputs and other clip
        lengths are resized/resampled to the model's spec. Also accepts a file path (an image,
        or for a video model a video file) or a PIL image (for a video model: a list of PIL
        frames): these go through the handler's decoding, face detection (largest face) and
        alignment.

        Returns:
            an index into :attr:`labels` (``int``), or a list of them for a batch.
        """
        batch, single = self._normalized_input(x)
        preds = self._predict_normalized(batch)
        return preds[0] if single else preds

    def predict(self, x: Any, k: int = 3) -> list[tuple[str, float]] | list[list[tuple[str, float]]]:
        """The top-``k`` ``(label, probability)`` pairs (calibrated, as the service answers) for one
        input of any form :meth:`recognize` takes, or a list of them for a batch."""
        probs, single = self._probabilities(x)
        top = [[(self.spec.labels[i], round(float(p), 6)) for p, i in zip(*row.topk(k))] for row in probs]
        return top[0] if single else top

    def batch_recognize(self, input_loader: Iterable) -> dict[Any, int]:
        """Recognise every input of a loader of ``(input, filename)`` batches.

        Returns:
            ``{filename: class index}`` (indices as :meth:`recognize` returns them).
        """
        out: dict[Any, int] = {}
        for x, names in input_loader:
            preds = self._predict_normalized(self.model_input(torch.as_tensor(x)))
            if isinstance(names, torch.Tensor):
                names = names.tolist()
            elif isinstance(names, (str, os.PathLike)):
                names = [names]
            if len(names) != len(preds):
                raise ValueError(f"batch has {len(preds)} inputs but {len(names)} filenames")
            out.update(zip(names, preds))
        return out

    def recognize_stream(self, source: Any, fps: float = 10.0, **options: Any) -> Iterator[dict[str, Any]]:
        """Live, per person: one answer per frame of a stream, as the ``emotion_live`` model gives
        them (the same state, tracking, smoothing and bounds: ``handlers.live_engine``), in process.

        ``source``: a video file or camera/stream address (read at ``fps``, as ``python -m
        serving.live`` sends it), or an iterable of PIL images or ``(time_s, PIL image)`` pairs.
        ``options`` override the live handler's (``handlers.contract.LIVE_DEFAULTS``: e.g.
        ``smooth_seconds``, ``keyframe_every``). Needs a per-frame video model, as the shipped
        one: ``EmotionRecognizer(model="emo_video_frames").recognize_stream("clip.mp4")``.
        Each answer: ``{"frame", "time", "people": [{"id", "box", "top3", "frame_top3",
        "probabilities", ...}]}``.
        """
        spec = self.spec.to_dict()
        if not is_frame_model(spec):
            raise ValueError(f"live streams need a per-frame video model, not {spec['arch']}: "
                             f"EmotionRecognizer(model='emo_video_frames') (the shipped video model)")
        opts = {**LIVE_DEFAULTS, "detection": self.face_detection, "detector": self.face_detector, **options}
        engine = LiveEngine(spec, opts, None if opts["detection"] == "never" else
                            detector_for(opts, self.device, max_faces=int(opts["max_people"])))

        @torch.inference_mode()
        def score(x: torch.Tensor) -> torch.Tensor:
            self.net.eval()
            return predict_logits(self.net, x.to(self.device), self._tta).float().softmax(-1).cpu()

        for t, img in _stream_frames(source, fps):
            yield live_run_one(engine, engine.frame(0, SDK_SEQUENCE, img, t), score)
        engine.store.close(SDK_SEQUENCE)

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """A batch in the SDK's tensor convention → the normalized float batch the model takes."""
        u8 = self.to_spec_uint8(x)
        return normalize(u8.to(self.device), self.spec.to_dict())

    def to_spec_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """A batch (images ``(N, C, H, W)`` or clips ``(N, C, T, H, W)``, float in [0, 1] or uint8)
        → uint8 at the spec's channels, size (and clip length), as serving decodes images."""
        spec = self.spec
        if self.task == "image":
            if x.dim() != 4:
                raise ValueError(f"expected an image batch (N, C, H, W), got shape {tuple(x.shape)}")
            return spec_uint8(_as_uint8(x), spec.to_dict())
        if x.dim() != 5:
            raise ValueError(f"expected a clip batch (N, C, T, H, W), got shape {tuple(x.shape)}")
        n, c, t, h, w = x.shape
        if spec.clip_len and t != spec.clip_len:
            x = x[:, :, sample_indices(t, int(spec.clip_len))]
            t = x.shape[2]
        frames = spec_uint8(_as_uint8(x.transpose(1, 2).reshape(n * t, c, h, w)), spec.to_dict())
        return frames.view(n, t, *frames.shape[1:]).transpose(1, 2).contiguous()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(task={self.task!r}, model={self.spec.arch!r}, device={str(self.device)!r}, "
                f"output_dir={str(self.output_dir)!r})")

    # ------------------------------------------------------------------ internals

    @property
    def _tta(self) -> bool:
        return bool(self.spec.extra.get("tta_flip"))

    def _normalized_input(self, x: Any) -> tuple[torch.Tensor, bool]:
        """Any input :meth:`recognize` takes → (normalized model batch, whether it was one input)."""
        if isinstance(x, (str, os.PathLike)):
            return self._file_input(Path(x))[None], True
        if isinstance(x, Image.Image):
            if self.task == "video":
                raise ValueError("a video model needs a clip: a video file, a list of PIL frames or a tensor")
            return self._pil_input(x)[None], True
        if isinstance(x, (list, tuple)) and x and all(isinstance(i, Image.Image) for i in x):
            if self.task == "video":
                return self._frames_input(list(x))[None], True
            return torch.stack([self._pil_input(i) for i in x]), False
        x = torch.as_tensor(x)
        single_dims = 4 if self.task == "video" else 3
        if x.dim() not in (single_dims, single_dims + 1):
            layout = "(3, T, H, W) or (N, 3, T, H, W)" if self.task == "video" else "(3, H, W) or (N, 3, H, W)"
            raise ValueError(f"expected a {self.task} tensor {layout}, got shape {tuple(x.shape)}")
        single = x.dim() == single_dims
        return self.model_input(x[None] if single else x), single

    def _probabilities(self, x: Any) -> tuple[torch.Tensor, bool]:
        batch, single = self._normalized_input(x)
        return self._batch_probabilities(batch), single

    def _engine_batch(self, x: torch.Tensor) -> torch.Tensor:
        """What the engine gets: uint8 images (so training uses the engine's augmentation);
        normalized float clips (the engine's uint8 augmentation is per image)."""
        x = torch.as_tensor(x)
        if self.task == "image":
            return self.to_spec_uint8(x)
        return normalize(self.to_spec_uint8(x), self.spec.to_dict(), channel_axis=-4)

    def _target(self, y: Any) -> torch.Tensor:
        y = torch.as_tensor(y).long()
        return y if self._to_ours is None else torch.as_tensor(self._to_ours)[y]

    @torch.inference_mode()
    def _batch_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities of a normalized batch, as served (a per-frame video model pools
        its frames: ``training.video_task.clip_probs``)."""
        self.net.eval()
        x = x.to(self.device)
        if self.task == "video":
            return clip_probs(self.net, x, self._tta).cpu()
        return predict_logits(self.net, x, self._tta).float().softmax(-1).cpu()

    def _predict_normalized(self, x: torch.Tensor) -> list[int]:
        preds = self._batch_probabilities(x).argmax(-1).tolist()
        return preds if self._from_ours is None else [self._from_ours[p] for p in preds]

    def _distributed_loader(self, loader: Iterable) -> Iterable:
        """Under DDP, give each process its own shard of a plain DataLoader's dataset."""
        if not self.distributed or not isinstance(loader, DataLoader):
            return loader
        if isinstance(loader.sampler, DistributedSampler):
            return loader
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=DistributedSampler(loader.dataset),
                          num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                          pin_memory=loader.pin_memory, drop_last=loader.drop_last)

    def _detector_or_none(self) -> Detector | None:
        if self.face_detection != "never" and self._detector is None:
            self._detector = detector_for({**IMAGE_DEFAULTS, "detector": self.face_detector}, self.device)
        return self._detector if self.face_detection != "never" else None

    def _face_crops(self, images: list[Image.Image]) -> list[Image.Image]:
        """Per image the face to classify: ``handlers.faces.largest_face`` (the handler's detection
        and alignment); with ``face_detection='always'`` an image without a face is refused."""
        spec, detector = self.spec, self._detector_or_none()
        crops = []
        for i, img in enumerate(images):
            crop = largest_face(img, detector, self.face_detection, int(spec.input_size), spec.face_margin,
                                int(spec.channels))
            if self.face_detection == "always" and not crop.detected:
                raise ValueError(f"no face found in image {i} (face_detection='always')")
            crops.append(crop.image)
        return crops

    def _pil_input(self, img: Image.Image) -> torch.Tensor:
        return to_model_input(self._face_crops([to_rgb(img)])[0], self.spec.to_dict())

    def _frames_input(self, frames: list[Image.Image]) -> torch.Tensor:
        clip_len = int(self.spec.clip_len) or len(frames)
        frames = [to_rgb(frames[i]) for i in sample_indices(len(frames), clip_len)]
        spec = self.spec.to_dict()
        return torch.stack([to_model_input(c, spec) for c in self._face_crops(frames)], dim=1)

    def _file_input(self, path: Path) -> torch.Tensor:
        if self.task == "image":
            return self._pil_input(decode_image(path.read_bytes()))
        return self._frames_input(read_clip(path, int(self.spec.clip_len) or 16).frames)

    def _shipped_model(self, name: str) -> nn.Module:
        """The shipped weights for ``name``; a video model without them starts its frame network
        from the shipped image weights; else random initialisation, with a warning."""
        path = Path(SHIPPED_WEIGHTS[self.task])
        if path.is_file():
            ckpt = load_file(path)
            arch = ckpt["spec"].get("arch") if is_checkpoint(ckpt) else None
            if arch == name:
                log.info("loading shipped weights %s", path)
                return model_from_weights(ckpt, path, name, self.task, strict_arch=True)
            log.warning("%s holds %r weights, not %r: not used", path, arch, name)
        model = create_model(name, default_spec(name))
        image_weights = Path(SHIPPED_WEIGHTS["image"])
        if self.task == "video" and hasattr(model, "load_frame_weights") and image_weights.is_file():
            try:
                image = load_file(image_weights)  # the frame network is the shipped image network
                model = create_model(name, with_frame_network(default_spec(name), image["spec"]))
                model.load_frame_weights(image)
                log.warning("no video weights: the frame network starts from %s", image_weights)
                return model
            except (ValueError, RuntimeError) as e:
                log.warning("image weights %s do not fit the frame network: %s", image_weights, e)
        log.warning("no pretrained %s weights found (looked for %s): starting from random initialisation",
                    self.task, path)
        return model


# ---------------------------------------------------------------------- helpers

SDK_SEQUENCE = "sdk"
"""The sequence id of :meth:`EmotionRecognizer.recognize_stream`'s one stream."""


def _stream_frames(source: Any, fps: float) -> Iterator[tuple[float, Image.Image]]:
    """``(time s, PIL image)`` of a stream source (see :meth:`EmotionRecognizer.recognize_stream`)."""
    if isinstance(source, (str, os.PathLike)):
        from serving.live import file_frames, open_source  # here: only file and camera streams need PyAV

        with open_source(str(source)) as container:
            yield from file_frames(container, fps)
        return
    for k, item in enumerate(source):
        yield item if isinstance(item, tuple) else (k / fps, item)


class _Batches:
    """A loader seen through the SDK's conversion: ``(engine batch, target)`` pairs."""

    def __init__(self, loader: Iterable, convert, target) -> None:
        self.loader, self.convert, self.target = loader, convert, target
        self.sampler = getattr(loader, "sampler", None)  # the engine calls sampler.set_epoch

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            yield self.convert(x), self.target(y)


def _label_maps(order: Sequence[str] | None) -> tuple[list[int] | None, list[int] | None]:
    """(your index → ours, our index → yours), or (None, None) for ``LABELS`` order."""
    if order is None:
        return None, None
    to_ours = [label_index(n) for n in order]
    if None in to_ours or sorted(to_ours) != list(range(len(LABELS))):
        raise ValueError(f"target_order must name each of {LABELS} once, got {tuple(order)}")
    from_ours = [0] * len(LABELS)
    for yours, ours in enumerate(to_ours):
        from_ours[ours] = yours
    return to_ours, from_ours


def _device(n_gpu: int) -> tuple[bool, torch.device]:
    """(distributed?, device) for ``n_gpu``; DDP only under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if n_gpu < 0:
        raise ValueError(f"n_gpu must be >= 0, got {n_gpu}")
    if n_gpu > 1 and world <= 1:
        raise RuntimeError(
            f"n_gpu={n_gpu}: more than one GPU trains with DistributedDataParallel, one process per GPU. "
            f"Launch your script with `torchrun --nproc-per-node {n_gpu} your_script.py` (keep n_gpu={n_gpu}); "
            f"each process then drives one GPU and the engine synchronises them with DDP.")
    if n_gpu >= 1 and not torch.cuda.is_available():
        raise RuntimeError(f"n_gpu={n_gpu} but no CUDA device is available; use n_gpu=0 for the CPU")
    if world > 1:
        if n_gpu not in (0, 1, world):
            log.warning("n_gpu=%d but torchrun started %d processes: using %d", n_gpu, world, world)
        _, _, device = setup_distributed()
        return True, device
    return False, torch.device("cuda:0" if n_gpu >= 1 else "cpu")


def model_from_file(path: Path, name: str, task: str, strict_arch: bool) -> nn.Module:
    """Our checkpoint (its spec decides the network) or a bare state_dict for network ``name``."""
    return model_from_weights(load_file(path), path, name, task, strict_arch)


def model_from_weights(obj: Mapping[str, Any], path: Path, name: str, task: str, strict_arch: bool) -> nn.Module:
    """:func:`model_from_file` for the already loaded contents of ``path``."""
    if is_checkpoint(obj):
        spec = ModelSpec.from_dict(obj["spec"])
        if spec.task != task:
            raise CheckpointError(f"{path}: holds a {spec.task} model ({spec.arch}), this recognizer is for {task}")
        if strict_arch and spec.arch != name:
            raise CheckpointError(f"{path}: holds {spec.arch!r} weights, but model={name!r} was asked for")
        model = create_model(spec.arch, spec)
        model.load_state_dict(obj["state_dict"])
        return model
    state = obj.get("state_dict", obj.get("model", obj))
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: neither an emotion checkpoint nor a state_dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel/DDP
    model = create_model(name, default_spec(name))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: a state_dict that does not fit {name!r} (pass model=<the network it "
                              f"was trained as>): {str(e).splitlines()[0]}") from e
    return model


def _as_uint8(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` float in [0, 1] (``ToTensor()``) or uint8 → uint8 pixels (rounded)."""
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise TypeError(f"expected a float or uint8 tensor, got {x.dtype}")
    lo, hi = (float(x.min()), float(x.max())) if x.numel() else (0.0, 0.0)
    if lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
        raise ValueError(
            f"float inputs must be in [0, 1] as transforms.ToTensor() gives them (values span "
            f"[{lo:.3g}, {hi:.3g}]): drop Normalize from your transforms, or pass uint8 pixels")
    return (x.float() * 255.0).round_().clamp_(0, 255).to(torch.uint8)
