"""What evaluation, the SDK and the exported TorchScript all score: a network wrapped as its spec
says (``extra["tta_flip"]``: mirror averaging; ``extra["temperature"]`` and ``extra["class_bias"]``:
calibrated logits)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn


class FlipAverage(nn.Module):
    """Test-time mirror averaging: the wrapped network's probabilities for the input and its
    horizontal mirror, averaged, returned as log-probabilities (so a softmax of the output gives
    the averaged probabilities). One forward pass over both halves."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        probs = self.model(torch.cat([x, x.flip(-1)], dim=0)).float().softmax(-1)
        return ((probs[:n] + probs[n:]) / 2).clamp_min(1e-12).log()


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
    """``model`` wrapped as its spec's ``extra`` says (or ``extra``, when given): mirror
    averaging, then temperature and class bias; ``tta_flip`` overrides the flag. The bare model
    when none is asked for."""
    if extra is None:
        extra = getattr(getattr(model, "spec", None), "extra", None) or {}
    out = model
    if extra.get("tta_flip") if tta_flip is None else tta_flip:
        out = FlipAverage(out)
    temperature = float(extra.get("temperature", 1.0) or 1.0)
    class_bias = [float(b) for b in extra.get("class_bias") or []]
    if temperature != 1.0 or any(class_bias):
        out = TemperatureScaled(out, temperature, class_bias if any(class_bias) else None)
    return out
