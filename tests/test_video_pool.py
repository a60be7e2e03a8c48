"""Pooling frame probabilities into a clip's answer (handlers/video_pool.py)."""
from __future__ import annotations

import pytest
import torch

from handlers.video_pool import POOLINGS, pool, pooling_from_spec
from model_defs import LABELS

NEUTRAL, HAPPY, SAD = LABELS.index("neutral"), LABELS.index("happy"), LABELS.index("sad")


def frames(classes: list[int], sure: float = 0.6) -> torch.Tensor:
    """One probability row per frame, ``sure`` on the given class, the rest spread evenly."""
    p = torch.full((len(classes), len(LABELS)), (1 - sure) / (len(LABELS) - 1))
    p[torch.arange(len(classes)), torch.tensor(classes)] = sure
    return p


def acted_clip() -> torch.Tensor:
    """Neutral at the start and the end, happy for a third of the clip in between."""
    return frames([NEUTRAL] * 8 + [HAPPY] * 6 + [NEUTRAL] * 6)


def test_mean_is_the_per_frame_baseline():
    p = torch.softmax(torch.randn(11, len(LABELS), generator=torch.Generator().manual_seed(0)), -1)
    assert torch.allclose(pool(p, LABELS, "mean"), p.mean(0))


def test_a_plain_mean_votes_neutral_on_an_acted_clip():
    assert int(pool(acted_clip(), LABELS, "mean").argmax()) == NEUTRAL


@pytest.mark.parametrize("method", ["confidence", "window", "peak"])
def test_expression_pooling_finds_the_expression(method):
    out = pool(acted_clip(), LABELS, method)
    assert int(out.argmax()) == HAPPY
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("method", POOLINGS)
def test_a_neutral_clip_stays_neutral(method):
    p = frames([NEUTRAL] * 12, sure=0.5)
    p[3] = frames([SAD], sure=0.3)[0]  # one unsure frame leaning sad
    assert int(pool(p, LABELS, method).argmax()) == NEUTRAL


def test_window_is_contiguous_and_peak_is_not():
    """Two short happy bursts far apart: the window (40% of frames) holds one burst only and is
    diluted by neutral frames; peak takes both bursts."""
    p = frames([HAPPY] * 3 + [NEUTRAL] * 14 + [HAPPY] * 3)
    peak = pool(p, LABELS, "peak", {"window": 0.3})
    window = pool(p, LABELS, "window", {"window": 0.3})
    assert int(peak.argmax()) == HAPPY and peak[HAPPY] > window[HAPPY]


def test_one_frame_and_bad_input():
    p = frames([SAD])
    for m in POOLINGS:
        assert torch.allclose(pool(p, LABELS, m), p[0])
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool(p, LABELS, "median")
    with pytest.raises(ValueError, match="T > 0"):
        pool(torch.empty(0, len(LABELS)), LABELS, "mean")


def test_pooling_from_spec():
    assert pooling_from_spec({"extra": {}})[0] == "mean"
    method, params = pooling_from_spec({"extra": {"pooling": "window", "pooling_params": {"window": 0.25}}})
    assert method == "window" and params["window"] == 0.25 and "gamma" in params
    with pytest.raises(ValueError):
        pooling_from_spec({"extra": {"pooling": "nope"}})
