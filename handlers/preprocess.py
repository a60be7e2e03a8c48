"""Image decoding and model-input preprocessing, shared by the handlers, evaluation and training.

A spec here is a plain dict (``input_size``, ``channels``, ``mean``, ``std``), as stored in the
TorchScript file's ``spec.json`` and in checkpoints.
"""
from __future__ import annotations

import io
import warnings
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

ORIENTATION_TAG = 0x0112  # EXIF Orientation


class InputError(ValueError):
    """A request the service cannot use; ``status`` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image (first frame, EXIF orientation applied).

    ``max_pixels``: refuse larger images with ``InputError(413)`` before decoding them (the
    handlers pass the serving limit, ``contract.MAX_IMAGE_PIXELS``); None: no limit of ours
    (training, evaluation), only PIL's own decompression-bomb error, whose global setting is
    left as it is.
    """
    if not data:
        raise InputError("empty request body: expected an encoded image", 400)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if max_pixels is None else "error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise InputError(f"image too large: {img.width}x{img.height} pixels "
                                 f"(limit {max_pixels} pixels)", 413)
            img.seek(0)
            img.load()
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"image too large: {e}", 413) from e
    except UnidentifiedImageError as e:
        raise InputError("cannot decode image: not a supported image format "
                         "(JPEG, PNG, WebP, BMP, TIFF, GIF)", 415) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"cannot decode image: corrupt or truncated data ({e})", 400) from e
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any mode (palette, RGBA, 16-bit, CMYK, ...) to RGB."""
    try:
        if img.getexif().get(ORIENTATION_TAG, 1) != 1:  # most images: no copy needed
            img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not lose the picture
        pass
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() or 1.0
        img = Image.fromarray((arr * (255.0 / hi)).clip(0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img.convert("RGB")


def to_model_input(img: Image.Image, spec: Mapping[str, Any]) -> torch.Tensor:
    """A face image (already cropped or aligned) → normalized ``(C, S, S)`` float tensor."""
    return normalize(to_uint8(img, spec), spec)


def to_uint8(img: Image.Image, spec: Mapping[str, Any]) -> torch.Tensor:
    """A PIL image → the spec's ``(C, S, S)`` uint8 tensor, through :func:`spec_uint8`."""
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    if img.mode == "RGB" and int(spec["channels"]) == 1:
        img = img.convert("L")  # PIL's C loop; bit-equal to to_grey (tests/test_preprocess_path.py)
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return spec_uint8(torch.from_numpy(arr.copy()), spec)


LUMA_WEIGHTS = (19595, 38470, 7471)
"""ITU-R 601 luma in 16-bit fixed point, exactly as PIL's ``convert("L")`` computes it."""


def to_grey(x: torch.Tensor) -> torch.Tensor:
    """uint8 RGB ``(..., 3, H, W)`` → uint8 grey ``(..., 1, H, W)``, bit-equal to PIL's ``convert("L")``."""
    w = torch.tensor(LUMA_WEIGHTS, dtype=torch.int32, device=x.device).view(3, 1, 1)
    return ((x.to(torch.int32) * w).sum(-3, keepdim=True) + 0x8000).bitwise_right_shift(16).to(torch.uint8)


PRE_SHRINK = 4
"""Pictures more than this many times the model's side are box-averaged to about that first."""


def spec_uint8(x: torch.Tensor, spec: Mapping[str, Any]) -> torch.Tensor:
    """THE preprocessing path, shared by serving, evaluation, training and the SDK: uint8 images
    ``(C, H, W)`` or ``(N, C, H, W)`` (C = 1 grey or 3 RGB) → the spec's channels (grey = PIL's
    luma, :func:`to_grey`; grey → RGB by copying) and square side (bilinear, antialiased when
    shrinking, rounded back to uint8)."""
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {x.dtype}")
    channels, size = int(spec["channels"]), int(spec["input_size"])
    if x.shape[-3] != channels:
        if x.shape[-3] == 3 and channels == 1:
            x = to_grey(x)
        elif x.shape[-3] == 1 and channels == 3:
            x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])
        else:
            raise ValueError(f"images have {x.shape[-3]} channels; expected 1 (grey) or 3 (RGB)")
    if tuple(x.shape[-2:]) == (size, size):
        return x.contiguous()
    batch = (x if x.dim() == 4 else x[None]).float()
    k = min(batch.shape[-2:]) // (PRE_SHRINK * size)
    if k >= 2:  # a large picture: box-average by k first (cheap), the antialiased resize does the rest
        batch = F.avg_pool2d(batch, k, k)
    out = F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out if x.dim() == 4 else out[0]


def normalize(x: torch.Tensor, spec: Mapping[str, Any], channel_axis: int = -3) -> torch.Tensor:
    """uint8 ``(..., C, H, W)`` → float, scaled to [0, 1] and normalized by the spec's mean/std
    (``channel_axis=-4`` for clips ``(..., C, T, H, W)``)."""
    c = int(spec["channels"])
    shape = (c,) + (1,) * (-channel_axis - 1)
    mean = torch.tensor(spec["mean"], dtype=torch.float32, device=x.device).view(shape)
    std = torch.tensor(spec["std"], dtype=torch.float32, device=x.device).view(shape)
    return (x.float() / 255.0 - mean) / std
