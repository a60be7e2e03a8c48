"""The hybrid video network (model_defs/video_nets.py): shapes, scripting, image weights."""
from __future__ import annotations

import pytest
import torch

from model_defs import create_model, default_spec, list_models, load_model, save_weights
from model_defs.video_nets import HybridVideoNet


@pytest.fixture(scope="module")
def model() -> HybridVideoNet:
    torch.manual_seed(0)
    return create_model("emo_video_hybrid").eval()


def clip(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 16, 48, 48, generator=torch.Generator().manual_seed(seed))


def test_registered_with_a_video_spec(model):
    assert "emo_video_hybrid" in list_models("video")
    spec = model.spec
    assert (spec.task, spec.clip_len, spec.input_size, spec.channels) == ("video", 16, 48, 1)
    assert spec.mean == default_spec("emo_resnet_s").mean and spec.std == default_spec("emo_resnet_s").std
    assert spec.extra["frame_arch"] == "emo_resnet_s" and "input_shape" not in spec.extra


def test_building_the_hybrid_leaves_its_spec_alone():
    spec = default_spec("emo_video_hybrid")
    before = spec.to_dict()
    create_model("emo_video_hybrid", spec)
    assert spec.to_dict() == before


def test_shapes(model):
    x = clip(3)
    with torch.no_grad():
        f = model.forward_features(x)
        assert f.shape == (3, model.num_features)
        assert model.forward_head(f).shape == (3, 7)
        assert torch.allclose(model(x), model.forward_head(f))


def test_scripted_matches_eager(model):
    scripted = torch.jit.script(model)
    x = clip(2, seed=1)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-5)
        assert scripted(clip(5)).shape == (5, 7)  # batch size is not baked in


def test_frames_are_taken_along_the_time_axis(model):
    """Frame t of the clip is frame t of the (N, C, T, H, W) input (permute, not reshape)."""
    x = clip(2)
    with torch.no_grad():
        per_frame = model.frame_features(x)
        for n in (0, 1):
            for t in (0, 7, 15):
                direct = model.frame_cnn.forward_features(x[n, :, t].unsqueeze(0))
                assert torch.allclose(per_frame[n, t], direct[0], atol=1e-5)


def test_starts_as_the_per_frame_baseline_with_image_weights(tmp_path):
    """With image weights loaded, the untrained video model = mean of the image model's logits."""
    torch.manual_seed(1)
    image = create_model("emo_resnet_s").eval()
    save_weights(image, tmp_path / "image.pth")
    video = create_model("emo_video_hybrid").eval()
    video.load_frame_weights(torch.load(tmp_path / "image.pth", weights_only=True))
    image = load_model(tmp_path / "image.pth")
    x = clip(2, seed=3)
    with torch.no_grad():
        frames = x.permute(0, 2, 1, 3, 4).reshape(-1, 1, 48, 48)
        baseline = image(frames).view(2, 16, 7).mean(dim=1)
        assert torch.allclose(video(x), baseline, atol=1e-4)
        for k, v in image.state_dict().items():
            assert torch.equal(video.frame_cnn.state_dict()[k], v)


def test_load_frame_weights_refuses_another_architecture(tmp_path):
    save_weights(create_model("emo_resnet_m"), tmp_path / "m.pth")
    video = create_model("emo_video_hybrid")
    with pytest.raises(ValueError, match="emo_resnet_m"):
        video.load_frame_weights(torch.load(tmp_path / "m.pth", weights_only=True))
    video.load_frame_weights(create_model("emo_resnet_s").state_dict())  # a bare state dict is fine


def test_options_in_spec_and_checkpoint_round_trip(tmp_path):
    spec = default_spec("emo_video_hybrid")
    spec.extra.update(bidirectional=False, hidden=64)
    model = create_model("emo_video_hybrid", spec)
    assert not model.rnn.bidirectional and model.rnn.hidden_size == 64
    save_weights(model, tmp_path / "v.pth")
    loaded = load_model(tmp_path / "v.pth")
    assert loaded.spec.extra["hidden"] == 64 and not loaded.rnn.bidirectional
    x = clip(1)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.eval()(x))


def test_both_branches_learn():
    torch.manual_seed(0)
    model = create_model("emo_video_hybrid").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(clip(2)), torch.tensor([0, 3]))
    loss.backward()
    assert model.fusion.grad is not None and model.fusion.grad[1] != 0  # the C3D weight moves
    for p in (model.rnn_proj.weight, model.attn[2].weight, model.frame_cnn.fc.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    opt.step()
