"""The checkpoint format: ``{"format": 1, "spec": {...}, "state_dict": {...}, ...}``.

Weights files and training checkpoints share it (training adds optimizer state and so on).
Everything is loaded with ``weights_only=True``; files are written atomically.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from torch import nn

from .registry import create_model
from .spec import ModelSpec

FORMAT_VERSION = 1
WEIGHTS_KEYS = ("format", "spec", "state_dict")
"""What every file of this format holds."""
TRAINING_STATE_KEYS = ("optimizer", "scheduler", "scaler", "epoch", "best", "history", "config")
"""What a training checkpoint adds (``training.engine``); everything else is plain metadata."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (unsafe, corrupt or not ours)."""


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """``write(file)`` into a temporary file in the same folder, fsync, then rename over ``path``:
    ``path`` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a weights file safely (``weights_only=True``): any dict of plain data and tensors
    (our checkpoints, or a bare ``state_dict``); pickled objects are refused with CheckpointError."""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: it holds pickled Python objects, not just weights "
            f"(only weights_only checkpoints are accepted; save a state_dict or use model_defs.save_weights): "
            f"{str(e).splitlines()[0]}") from e
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a checkpoint or state_dict, got {type(obj).__name__}")
    return obj


def is_checkpoint(obj: dict[str, Any]) -> bool:
    """True for a dict in this format (a spec and weights), False for e.g. a bare state_dict."""
    return isinstance(obj.get("spec"), dict) and "state_dict" in obj


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict safely (``weights_only=True``)."""
    ckpt = load_file(path, map_location)
    if not is_checkpoint(ckpt):
        raise CheckpointError(f"{path}: not an emotion checkpoint (needs 'spec' and 'state_dict')")
    return ckpt


def checkpoint_dict(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """The format's dict for a model: version, spec and weights (on the CPU), plus ``extra``."""
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    return {"format": FORMAT_VERSION, "spec": unwrap(model).spec.to_dict(), "state_dict": state, **extra}


def save_weights(model: nn.Module, path: str | os.PathLike, **meta: Any) -> None:
    """Save a model's weights with its spec (and optional plain-data metadata), atomically."""
    atomic_save(checkpoint_dict(model, **meta), path)


def metadata(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's plain metadata: everything but the weights, spec and training state."""
    return {k: v for k, v in ckpt.items() if k not in WEIGHTS_KEYS + TRAINING_STATE_KEYS}


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Build the network named in a checkpoint's spec and load its weights (eval mode, on
    ``map_location``)."""
    ckpt = load_checkpoint(path, map_location)
    spec = ModelSpec.from_dict(ckpt["spec"])
    model = create_model(spec.arch, spec)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(map_location).eval()


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def adapt_input_channels(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` with its first convolution fitted to ``model``'s input channels: a grey
    filter spread evenly over three colour channels (exact for a grey image copied to three), or
    colour filters summed into one grey channel. Other tensors are returned as they are."""
    own = model.state_dict()
    out = dict(state_dict)
    for key, w in state_dict.items():
        target = own.get(key)
        if target is None or w.dim() != 4 or target.dim() != 4 or w.shape == target.shape:
            continue
        if w.shape[0] == target.shape[0] and w.shape[2:] == target.shape[2:] and {w.shape[1], target.shape[1]} == {1, 3}:
            out[key] = w.expand(-1, 3, -1, -1) / 3 if target.shape[1] == 3 else w.sum(1, keepdim=True)
    return out
