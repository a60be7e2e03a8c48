"""EfficientNet-Lite2 (model_defs/efficientnet_lite.py): shapes, export, and the ImageNet start
read from the installed wheel (nothing downloaded)."""
from __future__ import annotations

import pytest
import torch

from model_defs import create_model, default_spec
from model_defs.efficientnet_lite import LITE2_STAGES, EmoEfficientNetLite, imagenet_lite2_state, rename_lite_state
from model_defs.spec import LABELS, ModelSpec


def test_untrained_network_shapes_and_torchscript():
    net = create_model("emo_efficientnet_lite2").eval()
    x = torch.rand(3, 1, 64, 64)
    assert net.forward_features(x).shape == (3, 1280)
    assert net(x).shape == (3, len(LABELS))
    assert len(net.blocks) == sum(s[0] for s in LITE2_STAGES) == 21
    scripted = torch.jit.script(net)
    assert torch.allclose(scripted(x), net(x), atol=1e-5)


def test_stochastic_depth_only_in_training():
    torch.manual_seed(0)
    net = create_model("emo_efficientnet_lite2")
    x = torch.rand(4, 1, 64, 64)
    net.eval()
    assert torch.equal(net(x), net(x))
    last = net.blocks[-2]  # a residual block with the largest drop rate
    assert last.residual and last.drop_path.p > 0.15
    last.drop_path.train()
    y = torch.rand(8, 208, 2, 2)
    with torch.no_grad():
        outs = [last(y) for _ in range(4)]
    assert not all(torch.equal(outs[0], o) for o in outs[1:])  # rows are dropped at random while training


def test_imagenet_start_loads_every_weight_and_folds_the_stem():
    state = imagenet_lite2_state()  # from the installed wheel; nothing is downloaded
    net = create_model("emo_efficientnet_lite2", pretrained=True)
    own = net.state_dict()
    assert set(own) - set(state) == {"fc.weight", "fc.bias"}
    for key, value in state.items():
        if key != "stem.0.weight":
            assert torch.equal(own[key], value), key
    assert torch.allclose(own["stem.0.weight"], state["stem.0.weight"].sum(1, keepdim=True))
    # a grey face copied to RGB gives the same features through the RGB network as through the grey one
    rgb = EmoEfficientNetLite(ModelSpec.from_dict({**default_spec("emo_efficientnet_lite2").to_dict(), "channels": 3}),
                              pretrained=True).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net.eval().forward_features(x), rgb.forward_features(x.expand(-1, 3, -1, -1)), atol=1e-4)


def test_renaming_refuses_unknown_weights():
    with pytest.raises(KeyError, match="_se_reduce"):
        rename_lite_state({"_blocks.1._se_reduce.weight": torch.zeros(1)})
    assert rename_lite_state({"_fc.weight": torch.zeros(1), "_bn1.bias": torch.ones(2)}).keys() == {"head.1.bias"}
