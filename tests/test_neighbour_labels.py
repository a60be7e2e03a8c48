"""tools/measure_neighbour_labels.py: the labels of a source's faces nearest to one set's faces of a class."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from model_defs import LABELS, create_model, save_weights

REPO = Path(__file__).resolve().parents[1]
GREY = REPO / "tests" / "fixtures" / "faces"  # FER2013 crops, 2 per class
COLOUR = REPO / "tests" / "fixtures" / "affectnet"  # AffectNet faces, 2 per class


def _tool():
    spec = importlib.util.spec_from_file_location("measure_neighbour_labels", REPO / "tools" / "measure_neighbour_labels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shares_count_the_labels_of_the_nearest_faces():
    tool = _tool()
    feats = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    labels = torch.tensor([LABELS.index("angry"), LABELS.index("angry"), LABELS.index("neutral"), LABELS.index("sad")])
    query = torch.nn.functional.normalize(torch.tensor([[0.05, 1.0]]), dim=1)
    shares = tool.neighbour_label_shares(query, feats, labels, k=2)
    assert shares[LABELS.index("neutral")] == pytest.approx(0.5) and shares[LABELS.index("sad")] == pytest.approx(0.5)
    assert float(shares.sum()) == pytest.approx(1.0)


def test_a_face_is_its_own_nearest_neighbour_and_other_sources_are_scored(tmp_path: Path, capsys):
    """Asked about a set's neutral faces with the set itself as a source and k = 1, every nearest
    face is the face itself, so the share of neutral is 1; another source gets a table row too."""
    torch.manual_seed(0)
    weights = tmp_path / "w.pth"
    save_weights(create_model("emo_mobilenet_v2"), weights)
    out = _tool().main(["--weights", str(weights), "--query", f"web={COLOUR}", "--class", "neutral", "--k", "1",
                        "--source", f"same={COLOUR}", "--source", f"grey={GREY}"])
    assert out["faces"] == 2 and set(out["sources"]) == {"same", "grey"}
    assert out["sources"]["same"]["neighbours"]["neutral"] == pytest.approx(1.0)
    assert out["sources"]["grey"]["source"]["neutral"] == pytest.approx(1 / 7)
    assert sum(out["sources"]["grey"]["neighbours"].values()) == pytest.approx(1.0)
    assert "| same |" in capsys.readouterr().out
