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
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

# Decompression-bomb guard, set deliberately: 40 megapixels is a 7300x5500 photo, more than
# any phone camera sends; larger images are refused with HTTP 413 rather than decoded.
MAX_IMAGE_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
ORIENTATION_TAG = 0x0112  # EXIF Orientation


class InputError(ValueError):
    """A request the service cannot use; ``status`` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image (first frame, EXIF orientation applied)."""
    if not data:
        raise InputError("empty request body: expected an encoded image", 400)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise InputError(f"image too large: {img.width}x{img.height} pixels "
                                 f"(limit {MAX_IMAGE_PIXELS} pixels)", 413)
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
    """Resize to the spec's square size and channels (and low-pass by ``extra.input_blur``, a
    Gaussian sigma in model pixels, when the spec asks); ``(C, S, S)`` uint8 tensor."""
    size = int(spec["input_size"])
    img = img.convert("L" if int(spec["channels"]) == 1 else "RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR, reducing_gap=None)
    arr = np.asarray(low_pass(img, spec), dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy())


def low_pass(img: Image.Image, spec: Mapping[str, Any]) -> Image.Image:
    """The spec's input low-pass: a Gaussian of sigma ``extra.input_blur`` (model pixels), which
    matches sharp inputs to the blurrier training data (see pretrain/MODEL_CARD.md); the image
    itself when the spec sets none."""
    sigma = float((spec.get("extra") or {}).get("input_blur", 0) or 0)
    return img.filter(ImageFilter.GaussianBlur(sigma)) if sigma > 0 else img


def normalize(x: torch.Tensor, spec: Mapping[str, Any]) -> torch.Tensor:
    """uint8 ``(..., C, H, W)`` → float, scaled to [0, 1] and normalized by the spec's mean/std."""
    c = int(spec["channels"])
    shape = (c, 1, 1)
    mean = torch.tensor(spec["mean"], dtype=torch.float32, device=x.device).view(shape)
    std = torch.tensor(spec["std"], dtype=torch.float32, device=x.device).view(shape)
    return (x.float() / 255.0 - mean) / std
