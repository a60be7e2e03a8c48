"""What evaluation, the SDK and the exported TorchScript all score: a network wrapped as its spec
says (``extra["tta_flip"]``: mirror averaging; ``extra["temperature"]``: calibrated logits)."""
from __future__ import annotations

from typing import Any, Mapping

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
    that a softmax of the output gives calibrated probabilities; the ranking is unchanged."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.model = model
        self.inv_temperature = float(1.0 / temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float() * self.inv_temperature


def inference_model(model: nn.Module, tta_flip: bool | None = None,
                    extra: Mapping[str, Any] | None = None) -> nn.Module:
    """``model`` wrapped as its spec's ``extra`` says (or ``extra``, when given): mirror
    averaging, then temperature; ``tta_flip`` overrides the flag. The bare model when neither
    is asked for."""
    if extra is None:
        extra = getattr(getattr(model, "spec", None), "extra", None) or {}
    out = model
    if extra.get("tta_flip") if tta_flip is None else tta_flip:
        out = FlipAverage(out)
    temperature = float(extra.get("temperature", 1.0) or 1.0)
    if temperature != 1.0:
        out = TemperatureScaled(out, temperature)
    return out
