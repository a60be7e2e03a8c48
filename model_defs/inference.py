"""What evaluation, the SDK and the exported TorchScript all score: a network wrapped as its spec
says (``extra["tta_scales"]`` and ``extra["tta_flip"]``: averaging over zoomed and mirrored views;
``extra["temperature"]`` and ``extra["class_bias"]``: calibrated logits)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def zoom(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The centre of each image in ``x`` (``(..., S, S)``) seen ``scale`` times larger, at the same
    size: above 1 a bilinear enlargement cropped to the centre, below 1 an antialiased reduction
    with its border filled by the nearest pixels."""
    size = x.shape[-1]
    n = int(size * scale + 0.5)
    if n == size:
        return x
    flat = x.reshape(-1, 1, x.shape[-2], size)
    y = F.interpolate(flat, size=[n, n], mode="bilinear", align_corners=False, antialias=n < size)
    if n > size:
        o = (n - size) // 2
        y = y[:, :, o:o + size, o:o + size]
    else:
        p = (size - n) // 2
        y = F.pad(y, [p, size - n - p, p, size - n - p], mode="replicate")
    return y.reshape(x.shape)


def zoom_matrix(size: int, scale: float) -> torch.Tensor:
    """``A`` (``size`` x ``size``) with ``zoom(x, scale) == A @ x @ A.T`` for every ``size`` x ``size``
    image: the zoom is separable, and each of its rows' weights sums to 1, so zooming the image
    whose row ``j`` is all ones gives column ``j`` of ``A`` in every column."""
    rows = torch.eye(size)[:, None, :, None].expand(size, 1, size, size)  # image j: row j all ones
    return zoom(rows, scale)[:, 0, :, 0].T.contiguous()


class ViewAverage(nn.Module):
    """Test-time averaging over views of each input: the wrapped network's probabilities for the
    ``size`` x ``size`` input seen at each of ``scales`` (:func:`zoom`) and, with ``flip``, their
    horizontal mirrors, averaged and returned as log-probabilities (so a softmax of the output
    gives the averaged probabilities). Every view is a fixed linear map ``L @ x @ R`` of the input,
    made in two batched matrix products, then one forward pass takes all the views."""

    def __init__(self, model: nn.Module, size: int, scales: Sequence[float] = (1.0,), flip: bool = False) -> None:
        super().__init__()
        if not scales or any(not s > 0 for s in scales):
            raise ValueError(f"test-time scales must be positive, got {list(scales)}")
        self.model = model
        left = torch.stack([zoom_matrix(size, s) for s in scales])
        right = left.transpose(1, 2)
        if flip:
            left, right = torch.cat([left, left]), torch.cat([right, right.flip(-1)])
        self.register_buffer("left", left[:, None])  # (V, 1, S, S)
        self.register_buffer("right", right[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, size = x.shape[0], x.shape[-1]
        views = torch.matmul(torch.matmul(self.left, x.reshape(1, -1, size, size)), self.right)
        probs = self.model(views.reshape([-1] + list(x.shape[1:]))).float().softmax(-1)
        return probs.view(self.left.shape[0], n, -1).mean(0).clamp_min(1e-12).log()


class TemperatureScaled(nn.Module):
    """Logits divided by a temperature fitted on validation data (Guo et al., ICML 2017), so
    that a softmax of the output gives calibrated probabilities; the ranking is unchanged.

    With ``class_bias``, a per-class offset is added after the division: bias-corrected
    temperature scaling (Alexandari et al., ICML 2020), which also moves the class priors that
    the training targets taught to those of the labels it was fitted on (this can change the
    ranking)."""

    def __init__(self, model: nn.Module, temperature: float, class_bias: Sequence[float] | None = None) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.model = model
        self.inv_temperature = float(1.0 / temperature)
        self.register_buffer("class_bias", torch.tensor(list(class_bias or []), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x).float() * self.inv_temperature
        if self.class_bias.numel() > 0:
            out = out + self.class_bias.to(out.device)
        return out


def inference_model(model: nn.Module, tta_flip: bool | None = None,
                    extra: Mapping[str, Any] | None = None) -> nn.Module:
    """``model`` wrapped as its spec's ``extra`` says (or ``extra``, when given): averaging over
    zoomed and mirrored views, then temperature and class bias; ``tta_flip`` overrides the mirror
    flag. The bare model when none is asked for."""
    if extra is None:
        extra = getattr(getattr(model, "spec", None), "extra", None) or {}
    out = model
    flip = bool(extra.get("tta_flip") if tta_flip is None else tta_flip)
    scales = [float(s) for s in extra.get("tta_scales") or [1.0]]
    if flip or scales != [1.0]:
        weights = next(model.parameters(), None)  # the views are made where the network runs
        out = ViewAverage(out, int(model.spec.input_size), scales, flip).to(
            weights.device if weights is not None else "cpu")
    temperature = float(extra.get("temperature", 1.0) or 1.0)
    class_bias = [float(b) for b in extra.get("class_bias") or []]
    if temperature != 1.0 or any(class_bias):
        out = TemperatureScaled(out, temperature, class_bias if any(class_bias) else None)
    return out
