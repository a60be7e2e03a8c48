"""The seed's Python SDK, kept for its users: ``EmotionRecognizer`` (alias ``Emotion_Recognize``).

A thin face over the one engine (``training.engine.fit`` / ``evaluate``), the model registry
and the checkpoint format: the same networks, weights and preprocessing as ``training.run``,
``training.evaluate`` and the TorchServe handlers. See ``docs/sdk.md``.

Tensor convention (the seed's): a **float** tensor is what ``transforms.ToTensor()`` gives,
RGB or grey values in ``[0, 1]``, not normalized, of any size; a **uint8** tensor holds pixel
values ``0..255``. Either is converted here to the model's spec exactly as a decoded image is
in serving (grey = ITU-R 601 luma as PIL's ``convert("L")``, antialiased bilinear resize to the
spec's side, then the spec's mean/std). Images are ``(3, H, W)``; clips are ``(3, T, H, W)``.
Clips built the seed's way (frames stacked ``(T, 3, H, W)`` then ``reshape``-d, not permuted,
to ``(3, T, H, W)``) are recognised, because the seed's frames are grey copies in three
channels, and put back in frame order.
"""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn

from model_defs import LABELS, CheckpointError, ModelSpec, create_model, default_spec, list_models

from .engine import FitConfig, evaluate, fit, predict_logits, setup_distributed

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WEIGHTS_DIR = REPO / "pretrain"
"""Where ``origin_*`` weights are looked for and ``best_*`` weights are written (the seed's ``pretrain/``)."""
SHIPPED_DIR = REPO / "pretrain"
"""Where the project's shipped weights live."""
DEFAULT_LOG_DIR = REPO / "runs" / "sdk"
"""TensorBoard logs and the per-epoch training checkpoint go to ``<log_dir>/<task>``."""

DEFAULT_MODEL = {"image": "emo_resnet_s", "video": "emo_video_hybrid"}
ORIGIN = {"image": "origin_pic_model.pth", "video": "origin_video_model.pth"}
SHIPPED = {"image": "emotion_image.pth", "video": "emotion_video.pth"}
BEST = {"image": "best_pic_model.pth", "video": "best_video_model.pth"}

RAF_DB_ORDER: tuple[str, ...] = ("surprise", "fear", "disgust", "happy", "sad", "angry", "neutral")
"""RAF-DB's own numbering (its list files say 1-7 in this order; the seed subtracts 1)."""

_LUMA = (0.299, 0.587, 0.114)  # PIL convert("L")
_RANGE_SLACK = 0.02


class EmotionRecognizer:
    """Train, evaluate and run an emotion model from Python, the seed SDK's way.

    Args:
        video: recognise video clips (True, the seed's default) or still images.
        pretrained: start from weights: ``<weights_dir>/origin_pic_model.pth`` or
            ``origin_video_model.pth`` when present, else the shipped ``pretrain/emotion_image.pth``
            / ``emotion_video.pth`` (a video model without video weights gets the image weights
            in its frame network), else random initialisation with a warning.
        n_gpu: 0 = CPU, 1 = one CUDA device; more = DistributedDataParallel, one process per
            GPU, started with ``torchrun --nproc-per-node N your_script.py``.
        weights_dir: the seed's ``pretrain/`` folder (default: this repository's).
        model: network name from the registry (default ``emo_resnet_s`` / ``emo_video_hybrid``).
        log_dir: TensorBoard logs (default ``runs/sdk``; ``<log_dir>/<image|video>/tb``).
        target_order: the class names of your label numbers 0-6, when they are not
            ``model_defs.LABELS`` order (e.g. :data:`RAF_DB_ORDER` for RAF-DB list files). Targets
            are mapped on the way in and ``recognize`` answers in your numbering.
        face_detection: ``auto`` / ``always`` / ``never``, for files and PIL images only
            (tensors are taken as face crops), as in the handler.
        Video, pretrain, nGPU: the seed's spellings of ``video``, ``pretrained``, ``n_gpu``.
    """

    def __init__(self, video: bool | None = None, pretrained: bool | None = None, n_gpu: int | None = None, *,
                 weights_dir: str | os.PathLike | None = None, model: str | None = None,
                 log_dir: str | os.PathLike | None = None, target_order: Sequence[str] | None = None,
                 face_detection: str = "auto", Video: bool | None = None, pretrain: bool | None = None,
                 nGPU: int | None = None) -> None:
        video = _alias("video", video, "Video", Video, True)
        pretrained = _alias("pretrained", pretrained, "pretrain", pretrain, True)
        n_gpu = int(_alias("n_gpu", n_gpu, "nGPU", nGPU, 0))
        self.task = "video" if video else "image"
        self.weights_dir = Path(weights_dir) if weights_dir is not None else Path(DEFAULT_WEIGHTS_DIR)
        self.log_dir = (Path(log_dir) if log_dir is not None else Path(DEFAULT_LOG_DIR)) / self.task
        if face_detection not in ("auto", "always", "never"):
            raise ValueError(f"face_detection must be auto, always or never, not {face_detection!r}")
        self.face_detection = face_detection
        self._to_ours, self._from_ours = _label_maps(target_order)
        self.distributed, self.device = _device(n_gpu)
        name = model or DEFAULT_MODEL[self.task]
        if name not in list_models(self.task):
            raise ValueError(f"unknown {self.task} model {name!r}; choose from {list_models(self.task)}")
        net = self._initial_model(name, explicit=model is not None, pretrained=bool(pretrained))
        self.net: nn.Module = net.to(self.device).eval()
        self.model: nn.Module = self.net
        if self.distributed:
            ids = [self.device] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        self._detector = None

    # ------------------------------------------------------------------ public API

    @property
    def spec(self) -> ModelSpec:
        """The model's spec (input size, channels, mean/std, labels, clip length)."""
        return self.net.spec

    @property
    def labels(self) -> list[str]:
        """Class names by the index ``recognize`` returns (your ``target_order`` if given)."""
        if self._from_ours is None:
            return list(self.spec.labels)
        return [self.spec.labels[i] for i in self._to_ours]

    def train(self, train_loader: Iterable, test_loader: Iterable, epochs: int, learn_rate: float = 3e-5,
              momentum: float = 0.9, weight_decay: float = 5e-4, *, weight_deacy: float | None = None
              ) -> dict[str, Any]:
        """Train or fine-tune on your loaders, evaluating on ``test_loader`` after every epoch.

        Loaders yield ``(input, target)`` batches: images ``(N, 3, H, W)`` or clips
        ``(N, 3, T, H, W)`` (see the module docstring for float/uint8), targets 0-6. Uses
        ``training.engine.fit`` (SGD with momentum, cosine schedule, the engine's batched
        augmentation for images). TensorBoard logs go to ``<log_dir>/<task>/tb``; the best
        epoch's weights to ``<weights_dir>/best_pic_model.pth`` / ``best_video_model.pth`` (the
        project's checkpoint format, loadable by ``model_defs.load_model`` and ``export``), and
        are loaded into this recognizer when training ends.

        ``weight_deacy`` is the seed README's spelling of ``weight_decay``.

        Returns:
            ``{'acc', 'acc_top3', 'best_epoch'}`` of the best epoch on ``test_loader``.
        """
        if weight_deacy is not None:
            weight_decay = weight_deacy
        best_path = (self.weights_dir / BEST[self.task]).resolve()
        cfg = FitConfig(epochs=int(epochs), lr=learn_rate, momentum=momentum, weight_decay=weight_decay,
                        tta_flip=self._tta, output_dir=str(self.log_dir),
                        best_name=str(best_path))  # absolute: Path(output_dir) / best_name == best_path
        tr = _Batches(self._distributed_loader(train_loader), self._engine_batch, self._target)
        te = _Batches(test_loader, self._engine_batch, self._target)
        meta = {"train_args": {"sdk": type(self).__name__, "task": self.task, "epochs": int(epochs),
                               "learn_rate": learn_rate, "momentum": momentum, "weight_decay": weight_decay}}
        result = fit(self.model, tr, te, cfg, self.device, extra_meta=meta)
        if self.distributed:  # rank 0 tracked the best epoch and wrote its weights: share both
            shared = [result]
            dist.broadcast_object_list(shared, src=0)
            result = shared[0]
        if best_path.exists():
            state = _safe_load(best_path)
            self.net.load_state_dict(state["state_dict"])
        self.net.eval()
        log.info("best epoch %d: acc %.4f; weights in %s", result["best_epoch"], result["acc"], best_path)
        return {"acc": result["acc"], "acc_top3": result["acc_top3"], "best_epoch": result["best_epoch"]}

    def eval(self, test_loader: Iterable, epoch: int = 1) -> dict[str, float]:
        """Evaluate on a loader of ``(input, target)`` batches.

        ``epoch`` only labels the log line (the seed used it for its training record).

        Returns:
            ``{'acc', 'acc_top3'}`` (fractions in [0, 1]).
        """
        res = evaluate(self.net, _Batches(test_loader, self._engine_batch, self._target), self.device,
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
        if isinstance(x, (str, os.PathLike)):
            return self._predict_normalized(self._file_input(Path(x))[None])[0]
        if isinstance(x, Image.Image):
            if self.task == "video":
                raise ValueError("a video model needs a clip: a video file, a list of PIL frames or a tensor")
            return self._predict_normalized(self._pil_input(x)[None])[0]
        if isinstance(x, (list, tuple)) and x and all(isinstance(i, Image.Image) for i in x):
            if self.task == "video":
                return self._predict_normalized(self._frames_input(list(x))[None])[0]
            return self._predict_normalized(torch.stack([self._pil_input(i) for i in x]))
        x = torch.as_tensor(x)
        single_dims = 4 if self.task == "video" else 3
        if x.dim() not in (single_dims, single_dims + 1):
            layout = "(3, T, H, W) or (N, 3, T, H, W)" if self.task == "video" else "(3, H, W) or (N, 3, H, W)"
            raise ValueError(f"expected a {self.task} tensor {layout}, got shape {tuple(x.shape)}")
        single = x.dim() == single_dims
        preds = self._predict_normalized(self.model_input(x[None] if single else x))
        return preds[0] if single else preds

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

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """A batch in the SDK's tensor convention → the normalized float batch the model takes."""
        u8 = self.to_spec_uint8(x)
        return _normalize(u8.to(self.device), self.spec)

    def to_spec_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """A batch (images ``(N, C, H, W)`` or clips ``(N, C, T, H, W)``, float in [0, 1] or uint8)
        → uint8 at the spec's channels, size (and clip length), as serving decodes images."""
        spec = self.spec
        if self.task == "image":
            if x.dim() != 4:
                raise ValueError(f"expected an image batch (N, C, H, W), got shape {tuple(x.shape)}")
            return _blur(_image_uint8(x, int(spec.channels), int(spec.input_size)), spec)
        if x.dim() != 5:
            raise ValueError(f"expected a clip batch (N, C, T, H, W), got shape {tuple(x.shape)}")
        x = _unscramble_seed_clips(x)
        n, c, t, h, w = x.shape
        if spec.clip_len and t != spec.clip_len:
            from handlers.video_decode import sample_indices
            x = x[:, :, sample_indices(t, int(spec.clip_len))]
            t = x.shape[2]
        frames = _blur(_image_uint8(x.transpose(1, 2).reshape(n * t, c, h, w), int(spec.channels),
                                    int(spec.input_size)), spec)
        return frames.view(n, t, *frames.shape[1:]).transpose(1, 2).contiguous()

    # ------------------------------------------------------------------ internals

    @property
    def _tta(self) -> bool:
        return bool(self.spec.extra.get("tta_flip"))

    def _engine_batch(self, x: torch.Tensor) -> torch.Tensor:
        """What the engine gets: uint8 images (so training uses the engine's augmentation);
        normalized float clips (the engine's uint8 augmentation is per image)."""
        x = torch.as_tensor(x)
        if self.task == "image":
            return self.to_spec_uint8(x)
        return _normalize(self.to_spec_uint8(x), self.spec)

    def _target(self, y: Any) -> torch.Tensor:
        y = torch.as_tensor(y).long()
        return y if self._to_ours is None else torch.as_tensor(self._to_ours)[y]

    @torch.inference_mode()
    def _predict_normalized(self, x: torch.Tensor) -> list[int]:
        self.net.eval()
        preds = predict_logits(self.net, x.to(self.device), self._tta).argmax(-1).tolist()
        return preds if self._from_ours is None else [self._from_ours[p] for p in preds]

    def _distributed_loader(self, loader: Iterable) -> Iterable:
        """Under DDP, give each process its own shard of a plain DataLoader's dataset."""
        from torch.utils.data import DataLoader, DistributedSampler
        if not self.distributed or not isinstance(loader, DataLoader):
            return loader
        if isinstance(loader.sampler, DistributedSampler):
            return loader
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=DistributedSampler(loader.dataset),
                          num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                          pin_memory=loader.pin_memory, drop_last=loader.drop_last)

    def _detector_or_none(self):
        if self.face_detection == "never":
            return None
        if self._detector is None:
            from handlers.faces import FaceDetector
            self._detector = FaceDetector(device=self.device)
        return self._detector

    def _face_crops(self, images: list[Image.Image]) -> list[Image.Image]:
        """The handler's detection and alignment: per image the largest face (or the whole image)."""
        from handlers.faces import faces_for_images
        spec = self.spec
        per_image = faces_for_images(images, self._detector_or_none(), self.face_detection, int(spec.input_size),
                                     spec.face_margin, int(spec.channels))
        crops = []
        for i, faces in enumerate(per_image):
            if not faces:
                raise ValueError(f"no face found in image {i} (face_detection='always')")
            crops.append(faces[0].image)  # largest first
        return crops

    def _pil_input(self, img: Image.Image) -> torch.Tensor:
        from handlers.preprocess import to_model_input, to_rgb
        return to_model_input(self._face_crops([to_rgb(img)])[0], self.spec.to_dict())

    def _frames_input(self, frames: list[Image.Image]) -> torch.Tensor:
        from handlers.preprocess import to_model_input, to_rgb
        from handlers.video_decode import sample_indices
        clip_len = int(self.spec.clip_len) or len(frames)
        frames = [to_rgb(frames[i]) for i in sample_indices(len(frames), clip_len)]
        spec = self.spec.to_dict()
        return torch.stack([to_model_input(c, spec) for c in self._face_crops(frames)], dim=1)

    def _file_input(self, path: Path) -> torch.Tensor:
        if self.task == "image":
            from handlers.preprocess import decode_image
            return self._pil_input(decode_image(path.read_bytes()))
        from handlers.video_decode import decode_frames, probe_video, sample_indices
        info = probe_video(path)
        idx = sample_indices(info.n_frames, int(self.spec.clip_len) or 16)
        decoded = decode_frames(path, idx)
        return self._frames_input([decoded[i] for i in idx])

    def _initial_model(self, name: str, explicit: bool, pretrained: bool) -> nn.Module:
        if not pretrained:
            return create_model(name, default_spec(name))
        origin = self.weights_dir / ORIGIN[self.task]
        if origin.is_file():
            log.info("loading your weights %s", origin)
            return _model_from_file(origin, name, self.task, strict_arch=explicit)
        for d in dict.fromkeys([self.weights_dir, Path(SHIPPED_DIR)]):
            path = d / SHIPPED[self.task]
            if path.is_file():
                ckpt = _safe_load(path)
                arch = ckpt.get("spec", {}).get("arch") if isinstance(ckpt.get("spec"), Mapping) else None
                if arch == name:
                    log.info("loading shipped weights %s", path)
                    return _model_from_file(path, name, self.task, strict_arch=True)
                log.warning("%s holds %r weights, not %r: not used", path, arch, name)
        model = create_model(name, default_spec(name))
        if self.task == "video" and hasattr(model, "load_frame_weights"):
            for d in dict.fromkeys([self.weights_dir, Path(SHIPPED_DIR)]):
                path = d / SHIPPED["image"]
                if path.is_file():
                    try:
                        model.load_frame_weights(_safe_load(path))
                        log.warning("no video weights: the frame network starts from %s", path)
                        return model
                    except (ValueError, RuntimeError) as e:
                        log.warning("image weights %s do not fit the frame network: %s", path, e)
        log.warning("no pretrained %s weights found (looked for %s, then %s in %s): starting from random "
                    "initialisation", self.task, origin, SHIPPED[self.task], self.weights_dir)
        return model

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(task={self.task!r}, model={self.spec.arch!r}, device={str(self.device)!r}, "
                f"weights_dir={str(self.weights_dir)!r})")


Emotion_Recognize = EmotionRecognizer
"""The seed's name for :class:`EmotionRecognizer`."""


# ---------------------------------------------------------------------- helpers

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


def _alias(name: str, value: Any, seed_name: str, seed_value: Any, default: Any) -> Any:
    if value is not None and seed_value is not None and value != seed_value:
        raise TypeError(f"{name}={value!r} and {seed_name}={seed_value!r} disagree; pass one of them")
    return next((v for v in (value, seed_value) if v is not None), default)


def _label_maps(order: Sequence[str] | None) -> tuple[list[int] | None, list[int] | None]:
    """(your index → ours, our index → yours), or (None, None) for ``LABELS`` order."""
    if order is None:
        return None, None
    from .datasets import label_index
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


def _safe_load(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with the checkpoint module's errors."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load: it holds pickled Python objects, not just weights "
                              f"(save a state_dict or use model_defs.save_weights)") from e
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a checkpoint or state_dict, got {type(obj).__name__}")
    return obj


def _model_from_file(path: Path, name: str, task: str, strict_arch: bool) -> nn.Module:
    """Our checkpoint (its spec decides the network) or a bare state_dict for network ``name``."""
    obj = _safe_load(path)
    if isinstance(obj.get("spec"), Mapping) and "state_dict" in obj:
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


def _blur(x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` through the spec's input low-pass, ``handlers.preprocess.low_pass``."""
    if not float(spec.extra.get("input_blur", 0) or 0) > 0:
        return x
    from PIL import Image

    from handlers.preprocess import low_pass

    spec_dict = spec.to_dict()
    out = []
    for img in x.permute(0, 2, 3, 1).cpu().numpy():  # (H, W, C) each
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        out.append(np.asarray(low_pass(pil, spec_dict)).reshape(img.shape))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def _image_uint8(x: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """``(N, C, H, W)`` float [0, 1] or uint8 → uint8 ``(N, channels, size, size)``."""
    if x.dtype == torch.uint8:
        if x.shape[1] == channels and x.shape[-2:] == (size, size):
            return x
        x = x.float() / 255.0
    elif x.is_floating_point():
        lo, hi = (float(x.min()), float(x.max())) if x.numel() else (0.0, 0.0)
        if lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
            raise ValueError(
                f"float inputs must be in [0, 1] as transforms.ToTensor() gives them (values span "
                f"[{lo:.3g}, {hi:.3g}]): drop Normalize from your transforms, or pass uint8 pixels")
        x = x.float()
    else:
        raise TypeError(f"expected a float or uint8 tensor, got {x.dtype}")
    c = x.shape[1]
    if c != channels:
        if c == 3 and channels == 1:
            x = (x * torch.tensor(_LUMA, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        elif c == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)
        else:
            raise ValueError(f"inputs have {c} channels; expected 1 (grey) or 3 (RGB)")
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def _unscramble_seed_clips(x: torch.Tensor) -> torch.Tensor:
    """Undo the seed's ``video.reshape(C, D, H, W)`` of stacked ``(D, C, H, W)`` grey frames.

    The seed's frames are grey copies in three channels, so read back as ``(D, 3, H, W)`` such a
    clip has three equal channels; a clip in true ``(3, D, H, W)`` order has that property only
    when all its frames are equal, and then both readings are the same clip.
    """
    if x.shape[1] != 3:
        return x
    n, c, t, h, w = x.shape
    out = x
    for i in range(n):
        frames = x[i].reshape(t, c, h, w)
        if torch.equal(frames[:, 0], frames[:, 1]) and torch.equal(frames[:, 0], frames[:, 2]):
            out = x.clone() if out is x else out
            out[i] = frames.transpose(0, 1)
    return out


def _normalize(x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` or ``(N, C, T, H, W)`` → float normalized by the spec's mean/std."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device).view(shape)
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device).view(shape)
    return (x.float() / 255.0 - mean) / std
