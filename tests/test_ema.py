"""The moving average of the weights (``--ema-epochs``): its decay, what it averages, and that a
resumed run continues it rather than starting it again."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_defs import create_model, load_checkpoint, load_model
from tests.test_training import _loaders
from training.ema import WeightAverage, ema_decay
from training.engine import FitConfig, evaluate_model, fit


def test_decay_has_the_time_constant_in_epochs():
    d = ema_decay(2.0, steps_per_epoch=400, every=8)  # 100 updates
    assert d == pytest.approx(0.99)
    assert d ** 100 == pytest.approx(torch.e ** -1, rel=0.01)
    assert ema_decay(0.001, 10, 8) == 0.0  # shorter than one update: follow the weights


def test_average_folds_in_every_nth_step_weights_and_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = WeightAverage(model, epochs=1.0, steps_per_epoch=8, every=4)  # 2 updates per epoch: decay 0.5
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(4.0)
    for _ in range(3):
        ema.step(model)
    assert torch.equal(ema.model[0].weight, start)  # no update before the 4th step
    for _ in range(4):  # AveragedModel copies on its first update (step 4), then lerps by (1 - decay)
        ema.step(model)
    with torch.no_grad():
        model[0].weight.add_(2.0)
    ema.step(model)
    assert torch.allclose(ema.model[0].weight, start + 1.0 + 0.5 * 2.0)
    assert torch.allclose(ema.model[1].running_mean, torch.full((2,), 4.0))


def test_fit_evaluates_the_average_and_resume_continues_it(tmp_path: Path):
    torch.manual_seed(0)
    train, val = _loaders()
    fit(create_model("emo_resnet_s"), train, val, FitConfig(epochs=2, lr=0.01, output_dir=str(tmp_path), ema_epochs=1))
    ck2 = load_checkpoint(tmp_path / "checkpoint.pth")
    assert ck2["ema"]["steps"] == 2 * len(train)
    assert all("ema_acc" in h for h in ck2["history"])
    res = fit(create_model("emo_resnet_s"), train, val,
              FitConfig(epochs=3, lr=0.01, output_dir=str(tmp_path), ema_epochs=1, resume=True))
    ck3 = load_checkpoint(tmp_path / "checkpoint.pth")
    assert ck3["ema"]["steps"] == 3 * len(train)  # continued, not restarted
    best = load_checkpoint(tmp_path / "best.pth")
    assert best["metrics"]["source"] == res["best_source"] in ("model", "ema")
    h = res["history"][res["best_epoch"] - 1]
    assert best["metrics"]["acc"] == pytest.approx(max(h["acc"], h["ema_acc"]))
    # the saved best really is the network that scored it
    assert evaluate_model(load_model(tmp_path / "best.pth"), val)["acc"] == pytest.approx(best["metrics"]["acc"])
