"""tools/probe_source_heads.py: per-source and joint linear heads on frozen features, and which
source each set's faces look like."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model_defs import LABELS, create_model, save_weights

REPO = Path(__file__).resolve().parents[1]
GREY = REPO / "tests" / "fixtures" / "faces"  # FER2013 crops, 2 per class
COLOUR = REPO / "tests" / "fixtures" / "affectnet"  # AffectNet faces, 2 per class
HAPPY, NEUTRAL = LABELS.index("happy"), LABELS.index("neutral")


def _tool():
    spec = importlib.util.spec_from_file_location("probe_source_heads", REPO / "tools" / "probe_source_heads.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _two_sources_disagreeing(n: int = 200) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features on one axis; source A calls the positive side happy, source B calls it neutral."""
    torch.manual_seed(0)
    x = torch.randn(n, 2)
    side = (x[:, 0] > 0).long()
    a = F.one_hot(torch.where(side == 1, HAPPY, NEUTRAL), len(LABELS)).float()
    b = F.one_hot(torch.where(side == 1, NEUTRAL, HAPPY), len(LABELS)).float()
    return x, a, b


def test_a_head_per_source_learns_each_habit_and_a_joint_head_must_choose():
    tool = _tool()
    x, a, b = _two_sources_disagreeing()
    init = torch.nn.Linear(2, len(LABELS))
    head_a = tool.fit_head([(x, a, 1.0)], init, adjust=False)
    head_b = tool.fit_head([(x, b, 1.0)], init, adjust=False)
    assert tool.scores(head_a(x).argmax(1), a.argmax(1))["acc"] > 0.95
    assert tool.scores(head_b(x).argmax(1), b.argmax(1))["acc"] > 0.95
    mostly_a = tool.fit_head([(x, a, 0.8), (x, b, 0.2)], init)
    both = [tool.scores(mostly_a(x).argmax(1), t.argmax(1))["acc"] for t in (a, b)]
    assert both[0] > 0.95 and both[1] < 0.05  # one answer per face: agreeing with A is disagreeing with B


def test_scores_give_top1_and_each_present_class_recall():
    tool = _tool()
    labels = torch.tensor([HAPPY, HAPPY, NEUTRAL, NEUTRAL])
    s = tool.scores(torch.tensor([HAPPY, NEUTRAL, NEUTRAL, NEUTRAL]), labels)
    assert s["acc"] == pytest.approx(0.75)
    assert s["recall"]["happy"] == pytest.approx(0.5) and s["recall"]["neutral"] == pytest.approx(1.0)
    assert s["recall"]["angry"] is None


def test_the_source_probe_tells_sources_apart_and_shares_sum_to_one():
    tool = _tool()
    torch.manual_seed(0)
    near, far = torch.randn(100, 4), torch.randn(100, 4) + torch.tensor([6.0, 0, 0, 0])
    probe = tool.source_probe([near, far])
    labels = torch.cat([torch.full((50,), HAPPY), torch.full((50,), NEUTRAL)])
    lk = tool.likeness(probe, far, labels, ["near", "far"])
    assert lk["all"]["far"] > 0.95 and sum(lk["all"].values()) == pytest.approx(1.0)
    assert set(lk["by_class"]) == {"happy", "neutral"}


def test_the_tool_scores_every_head_on_every_val_set(tmp_path: Path, capsys):
    """Real images through the preprocessing contract: grey FER2013 crops and colour AffectNet faces."""
    torch.manual_seed(0)
    weights = tmp_path / "w.pth"
    save_weights(create_model("emo_mobilenet_v2"), weights)
    out = _tool().main(["--weights", str(weights), "--source", f"grey={GREY}", "--source", f"web={COLOUR}",
                        "--val", f"grey_val={GREY}", "--val", f"web_val={COLOUR}", "--share", "0.5", "--threads", "1"])
    assert set(out["heads"]) == {"own head", "grey alone", "web alone", "joint, 0.5 not grey"}
    for by_val in out["heads"].values():
        assert set(by_val) == {"grey_val", "web_val"} and all(0 <= s["acc"] <= 1 for s in by_val.values())
    assert out["heads"]["grey alone"]["grey_val"]["acc"] > out["heads"]["own head"]["grey_val"]["acc"] - 1e-6
    assert sum(out["likeness"]["web_val"]["all"].values()) == pytest.approx(1.0)
    printed = capsys.readouterr().out
    assert "| joint, 0.5 not grey |" in printed and "| web_val |" in printed
