"""Batched augmentation on the training device (uint8 batch in, normalized float batch out)."""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import gaussian_blur

from handlers.preprocess import normalize

from .losses import target_distribution


@dataclass
class AugmentConfig:
    rotate: float = 15.0  # degrees
    scale: tuple[float, float] = (0.85, 1.15)
    translate: float = 0.1  # fraction of the side
    hflip: float = 0.5
    brightness: float = 0.3
    contrast: float = 0.3
    erase: float = 0.25  # probability of random erasing
    mixup: float = 0.0  # alpha; 0 = off
    cutmix: float = 0.0  # alpha; 0 = off
    mix_prob: float = 0.5
    # Degradations that match what the face detector hands over from real photos (each applied
    # to a random share of the batch): a face shot at another resolution, JPEG, blur, exposure.
    rescale: float = 0.5  # probability of a down/up-scale round trip
    rescale_px: tuple[int, int] = (24, 96)  # the face's side in the photo, in pixels
    jpeg: float = 0.3  # probability of a JPEG round trip
    jpeg_quality: tuple[int, int] = (20, 95)
    blur: float = 0.2  # probability of a Gaussian blur
    blur_sigma: tuple[float, float] = (0.3, 1.2)  # in model pixels
    gamma: float = 0.3  # probability of a gamma change
    gamma_range: tuple[float, float] = (0.6, 1.6)


def geometric(x: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """Random rotation, scale, translation and horizontal flip as one affine warp."""
    n, dev = x.shape[0], x.device
    ang = (torch.rand(n, device=dev) * 2 - 1) * math.radians(cfg.rotate)
    sc = torch.empty(n, device=dev).uniform_(*cfg.scale)
    flip = torch.where(torch.rand(n, device=dev) < cfg.hflip, -1.0, 1.0)
    tx, ty = [(torch.rand(n, device=dev) * 2 - 1) * cfg.translate * 2 for _ in range(2)]
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _chosen(n: int, p: float) -> list[int]:
    return torch.nonzero(torch.rand(n) < p).flatten().tolist() if p > 0 else []


def jpeg_round_trip(img: torch.Tensor, quality: int) -> torch.Tensor:
    """uint8 ``(C, H, W)`` through a JPEG encoder at ``quality`` and back (PIL, as photos are decoded)."""
    arr = img.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, "JPEG", quality=quality)
    out = np.asarray(Image.open(buf))
    return torch.from_numpy(out.reshape(arr.shape).copy()).permute(2, 0, 1)


def degrade(x: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """uint8 ``(N, C, S, S)`` → float [0, 1], with photo-like degradations on random images:
    a resolution round trip (the face was ``rescale_px`` wide), JPEG at a random quality, a
    Gaussian blur and a gamma change."""
    n, _, h, w = x.shape
    x = x.clone()
    for i in _chosen(n, cfg.rescale):
        side = int(torch.randint(cfg.rescale_px[0], cfg.rescale_px[1] + 1, ()))
        small = F.interpolate(x[i:i + 1].float(), size=(side, side), mode="bilinear", antialias=True)
        x[i] = F.interpolate(small, size=(h, w), mode="bilinear", antialias=True).round().clamp(0, 255).to(x.dtype)
    for i in _chosen(n, cfg.jpeg):
        q = int(torch.randint(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1, ()))
        x[i] = jpeg_round_trip(x[i].cpu(), q).to(x.device)
    for i in _chosen(n, cfg.blur):
        sigma = float(torch.empty(1).uniform_(*cfg.blur_sigma))
        x[i] = gaussian_blur(x[i:i + 1].float(), [5, 5], [sigma])[0].round().to(x.dtype)
    out = x.float() / 255.0
    idx = _chosen(n, cfg.gamma)
    if idx:
        lo, hi = math.log(cfg.gamma_range[0]), math.log(cfg.gamma_range[1])
        g = torch.empty(len(idx), 1, 1, 1, device=x.device).uniform_(lo, hi).exp()
        out[idx] = out[idx].clamp_min(1e-6) ** g
    return out


def photometric(x: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """Brightness and contrast jitter on [0, 1] images."""
    n, dev = x.shape[0], x.device
    b = 1 + (torch.rand(n, 1, 1, 1, device=dev) * 2 - 1) * cfg.brightness
    c = 1 + (torch.rand(n, 1, 1, 1, device=dev) * 2 - 1) * cfg.contrast
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * c + mean * b).clamp(0, 1)


def random_erase(x: torch.Tensor, p: float) -> torch.Tensor:
    """Erase one random rectangle (2-25% of the area) per image with probability ``p``."""
    n, _, h, w = x.shape
    out = x.clone()
    for i in torch.nonzero(torch.rand(n) < p).flatten().tolist():
        area = h * w * float(torch.empty(1).uniform_(0.02, 0.25))
        ratio = math.exp(float(torch.empty(1).uniform_(math.log(0.3), math.log(3.3))))
        eh, ew = min(h, int(round(math.sqrt(area * ratio)))), min(w, int(round(math.sqrt(area / ratio))))
        y0, x0 = int(torch.randint(0, h - eh + 1, ())), int(torch.randint(0, w - ew + 1, ()))
        out[i, :, y0:y0 + eh, x0:x0 + ew] = torch.rand(out.shape[1], eh, ew, device=x.device)
    return out


def mix(x: torch.Tensor, y: torch.Tensor, cfg: AugmentConfig, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix on a batch; ``y`` is class indices or ``(N, K)`` soft targets; returns
    images and soft targets."""
    target = target_distribution(y, num_classes)
    if (cfg.mixup <= 0 and cfg.cutmix <= 0) or float(torch.rand(())) > cfg.mix_prob:
        return x, target
    perm = torch.randperm(x.shape[0], device=x.device)
    use_cutmix = cfg.cutmix > 0 and (cfg.mixup <= 0 or float(torch.rand(())) < 0.5)
    lam = float(torch.distributions.Beta(*(2 * [cfg.cutmix if use_cutmix else cfg.mixup])).sample())
    if use_cutmix:
        h, w = x.shape[-2:]
        ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
        y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = lam * x + (1 - lam) * x[perm]
    return x, lam * target + (1 - lam) * target[perm]


def train_batch(x: torch.Tensor, y: torch.Tensor, spec: Mapping[str, Any], cfg: AugmentConfig,
                num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 batch → degraded, augmented, normalized float batch and soft targets."""
    x = degrade(x, cfg)
    x = photometric(geometric(x, cfg), cfg)
    if cfg.erase > 0:
        x = random_erase(x, cfg.erase)
    x, target = mix(x, y, cfg, num_classes)
    return normalize(x * 255.0, spec), target
