"""Test-time averaging over zoomed views (``spec.extra["tta_scales"]``): the views are exact linear
maps of the input, the averaged answer is the mean of the views' probabilities, and calibration
stores the scales so that evaluation and the exported TorchScript score alike."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model_defs import create_model, load_model, save_weights
from model_defs.inference import ViewAverage, inference_model, zoom, zoom_matrix

FACES = Path(__file__).parent / "fixtures" / "faces"


def _by_hand(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The zoom as documented, written out with ``F.interpolate`` on a 4-D batch."""
    size = x.shape[-1]
    n = int(size * scale + 0.5)
    if n > size:
        o = (n - size) // 2
        return F.interpolate(x, size=(n, n), mode="bilinear", align_corners=False)[..., o:o + size, o:o + size]
    if n < size:
        p = (size - n) // 2
        small = F.interpolate(x, size=(n, n), mode="bilinear", align_corners=False, antialias=True)
        return F.pad(small, (p, size - n - p, p, size - n - p), mode="replicate")
    return x


@pytest.mark.parametrize("size", [48, 64, 65])
@pytest.mark.parametrize("scale", [0.85, 0.9, 1.0, 1.1, 1.2])
def test_zoom_is_the_linear_map_it_stores(size: int, scale: float):
    x = torch.randn(3, 1, size, size)
    a = zoom_matrix(size, scale)
    assert torch.allclose(a @ x @ a.T, _by_hand(x, scale), atol=1e-5)
    assert torch.allclose(zoom(x, scale), _by_hand(x, scale), atol=1e-6)
    assert torch.allclose(a.sum(1), torch.ones(size), atol=1e-5)  # a flat image stays flat


def test_zoom_enlarges_and_reduces_the_centre():
    x = torch.zeros(1, 1, 64, 64)
    x[..., 22:42, 22:42] = 1.0  # a 20-px bright square in the centre
    bright = {s: int((zoom(x, s) > 0.5).sum()) for s in (0.8, 1.0, 1.25)}
    assert bright[1.0] == 400
    assert 14 ** 2 <= bright[0.8] <= 18 ** 2 and 23 ** 2 <= bright[1.25] <= 27 ** 2
    assert zoom(x, 0.8)[..., 0, 0].item() == 0.0  # the border is the image's own edge, not a new value


@pytest.mark.parametrize("flip", [False, True])
def test_view_average_is_the_mean_of_the_views(flip: bool):
    torch.manual_seed(0)
    model = create_model("emo_resnet_s").eval()
    with torch.no_grad():  # peaky outputs, so that the views' answers differ visibly
        model.fc.weight.mul_(200.0)
    scales = [0.9, 1.0, 1.1]
    averaged = ViewAverage(model, 48, scales, flip).eval()
    x = torch.randn(5, 1, 48, 48)
    with torch.inference_mode():
        views = [_by_hand(x, s) for s in scales]
        views += [v.flip(-1) for v in views] if flip else []
        want = torch.stack([model(v).softmax(-1) for v in views]).mean(0)
        got = averaged(x).softmax(-1)
        scripted = torch.jit.script(averaged)(x).softmax(-1)
        plain = model(x).softmax(-1)
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(scripted, want, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-3)


def test_views_of_clips_are_the_views_of_each_frame():
    """Video models take (N, C, T, S, S): every frame is zoomed alike."""
    clips = torch.randn(2, 1, 3, 48, 48)
    a = zoom_matrix(48, 1.1)
    zoomed = a @ clips.reshape(1, -1, 48, 48) @ a.T
    frames = torch.stack([_by_hand(clips[:, :, t], 1.1) for t in range(3)], dim=2)
    assert torch.allclose(zoomed.reshape(clips.shape), frames, atol=1e-5)


def test_inference_model_reads_the_scales_from_the_spec():
    model = create_model("emo_resnet_s").eval()
    assert inference_model(model) is model
    model.spec.extra["tta_scales"] = [1.0, 1.1]
    wrapped = inference_model(model)
    assert isinstance(wrapped, ViewAverage) and wrapped.left.shape[0] == 2
    assert inference_model(model, tta_flip=True).left.shape[0] == 4
    with pytest.raises(ValueError, match="positive"):
        ViewAverage(model, 48, [1.0, 0.0])


def test_calibrate_stores_scales_that_export_and_evaluation_apply(tmp_path: Path):
    from export.torchscript import export_torchscript, load_scripted
    from training.calibrate import get_args_parser, main as calibrate
    from training.engine import predict_logits

    torch.manual_seed(0)
    model = create_model("emo_resnet_s").eval()
    with torch.no_grad():
        model.fc.weight.mul_(50.0)
    save_weights(model, tmp_path / "w.pth")
    args = ["--weights", str(tmp_path / "w.pth"), "--data", str(FACES), "--out", str(tmp_path / "c.pth"), "-j", "0"]
    out = calibrate(get_args_parser().parse_args(args + ["--tta-scales", "0.9", "1.0", "1.1"]))
    assert out["tta_scales"] == [0.9, 1.0, 1.1]
    calibrated = load_model(tmp_path / "c.pth")
    assert calibrated.spec.extra["tta_scales"] == [0.9, 1.0, 1.1]
    scripted, spec = load_scripted(export_torchscript(calibrated, calibrated.spec.to_dict(), tmp_path / "m.pt"))
    x = torch.randn(4, 1, 48, 48)
    with torch.inference_mode():
        views = torch.stack([model(_by_hand(x, s)).softmax(-1) for s in (0.9, 1.0, 1.1)]).mean(0)
        want = (views.log() / out["temperature"]).softmax(-1)
        served, evaluated = scripted(x).softmax(-1), predict_logits(calibrated, x).softmax(-1)
    assert torch.allclose(served, want, atol=1e-5) and torch.allclose(evaluated, want, atol=1e-5)
    # without the option the weights keep their scales; the single scale 1.0 removes them
    calibrate(get_args_parser().parse_args(
        ["--weights", str(tmp_path / "c.pth"), "--data", str(FACES), "--out", str(tmp_path / "d.pth"), "-j", "0"]))
    assert load_model(tmp_path / "d.pth").spec.extra["tta_scales"] == [0.9, 1.0, 1.1]
    calibrate(get_args_parser().parse_args(
        ["--weights", str(tmp_path / "c.pth"), "--data", str(FACES), "--out", str(tmp_path / "e.pth"), "-j", "0",
         "--tta-scales", "1.0"]))
    assert "tta_scales" not in load_model(tmp_path / "e.pth").spec.extra
    with pytest.raises(SystemExit):
        calibrate(get_args_parser().parse_args(args + ["--tta-scales", "-1"]))
