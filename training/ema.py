"""An exponential moving average of the weights, evaluated beside the trained ones (``--ema-epochs``).

As in torchvision's ``references/classification`` (``--model-ema``): a copy of the model whose
parameters and buffers follow the trained ones, updated every ``every`` optimizer steps. Here its
decay is set by a time constant in epochs, so one setting means the same for any dataset size.
"""
from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from model_defs import unwrap


def ema_decay(epochs: float, steps_per_epoch: int, every: int) -> float:
    """The per-update decay whose time constant is ``epochs`` epochs of ``steps_per_epoch`` steps."""
    updates = max(epochs * steps_per_epoch / every, 1.0)
    return 1.0 - 1.0 / updates


class WeightAverage:
    """The moving average of a model's weights (batch-norm statistics included)."""

    def __init__(self, model: nn.Module, epochs: float, steps_per_epoch: int, every: int = 8):
        self.every, self.steps = every, 0
        decay = ema_decay(epochs, steps_per_epoch, every)
        self.average = AveragedModel(unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    def step(self, model: nn.Module) -> None:
        """Called after every optimizer step; folds the weights in every ``every`` steps."""
        self.steps += 1
        if self.steps % self.every == 0:
            self.average.update_parameters(unwrap(model))

    @property
    def model(self) -> nn.Module:
        """The averaged network itself (same class and spec as the trained one)."""
        return self.average.module

    def state_dict(self) -> dict:
        return {"steps": self.steps, "average": self.average.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self.average.load_state_dict(state["average"])
