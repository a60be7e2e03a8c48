"""Video emotion networks: the per-frame model (shipped) and the hybrid CNN-RNN + C3D model.

``emo_video_frames`` is an image network run on every sampled frame's face, ``(N, C, S, S)`` in,
logits out; the serving pipeline pools the frames of each clip (``handlers/video_pool.py``, the
spec's ``extra["pooling"]``). Its spec is made from an image checkpoint's by
:func:`video_spec_from_image` (``python -m training.video_from_image``).

The hybrid, after Fan et al. (ICMI 2016), scores whole clips.

Input clips are ``(N, C, T, H, W)`` (frames are face crops preprocessed like the image model's
input). Two branches, fused by learned weights on their logits:

* CNN-RNN: the image network (``spec.extra["frame_arch"]``) on every frame, a GRU over the frame
  features added back as a residual, attention pooling over time, and the image network's own
  classifier. The residual projection and the attention scorer start at zero, so with the image
  weights loaded (:meth:`HybridVideoNet.load_frame_weights`) this branch starts out exactly as
  the per-frame baseline (the image model's logits averaged over the clip); training moves it
  away from there only where that helps.
* C3D: a few small 3D convolutions over the whole clip (motion), then a linear classifier. Its
  fusion weight starts at zero.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import torch
from torch import nn

from .registry import create_model, default_spec, register_model
from .spec import LABELS, ModelSpec


def _conv3d_bn(cin: int, cout: int, stride: tuple[int, int, int]) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm3d(cout),
                         nn.ReLU(inplace=True))


class C3DBranch(nn.Module):
    """Compact 3D CNN: the first layer keeps every frame, the others halve time and space."""

    def __init__(self, channels: int, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        layers, cin = [], channels
        for i, w in enumerate(widths):
            layers.append(_conv3d_bn(cin, w, (1, 2, 2) if i == 0 else (2, 2, 2)))
            cin = w
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.num_features = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.body(x)), 1)


class HybridVideoNet(nn.Module):
    """CNN-RNN (GRU + attention) and C3D branches with learned score fusion."""

    def __init__(self, spec: ModelSpec, frame_arch: str = "emo_resnet_s", hidden: int = 128,
                 bidirectional: bool = True, c3d_widths: tuple[int, ...] = (16, 32, 64, 128),
                 drop: float = 0.3) -> None:
        super().__init__()
        frame_spec = replace(default_spec(frame_arch), input_size=spec.input_size, channels=spec.channels,
                             mean=spec.mean, std=spec.std, labels=spec.labels)
        self.frame_arch = frame_arch
        self.frame_cnn = create_model(frame_arch, frame_spec)
        dim = int(self.frame_cnn.num_features)
        self.frame_dim = dim
        self.rnn = nn.GRU(dim, hidden, batch_first=True, bidirectional=bidirectional)
        rnn_out = hidden * (2 if bidirectional else 1)
        self.rnn_proj = nn.Linear(rnn_out, dim)
        self.attn = nn.Sequential(nn.Linear(dim, 64), nn.Tanh(), nn.Linear(64, 1))
        self.c3d = C3DBranch(spec.channels, tuple(c3d_widths))
        self.c3d_drop = nn.Dropout(drop)
        self.c3d_fc = nn.Linear(self.c3d.num_features, len(spec.labels))
        self.fusion = nn.Parameter(torch.tensor([1.0, 0.0]))  # weights of (CNN-RNN, C3D) logits
        self.num_features = dim + self.c3d.num_features
        for p in (self.rnn_proj.weight, self.rnn_proj.bias, self.attn[2].weight, self.attn[2].bias):
            nn.init.zeros_(p)

    def frame_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, T, H, W)`` → per-frame image features ``(N, T, D)``."""
        n, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
        return self.frame_cnn.forward_features(frames).view(n, t, -1)

    def temporal_pool(self, f: torch.Tensor) -> torch.Tensor:
        """Frame features ``(N, T, D)`` → GRU residual → attention-pooled ``(N, D)``."""
        seq, _ = self.rnn(f)
        f = f + self.rnn_proj(seq)
        weights = torch.softmax(self.attn(f), dim=1)  # (N, T, 1)
        return (weights * f).sum(dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.temporal_pool(self.frame_features(x))
        return torch.cat([pooled, self.c3d(x)], dim=1)

    def branch_logits(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the CNN-RNN and C3D branches from :meth:`forward_features` output."""
        rnn_f, c3d_f = f[:, : self.frame_dim], f[:, self.frame_dim:]
        return self.frame_cnn.forward_head(rnn_f), self.c3d_fc(self.c3d_drop(c3d_f))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        rnn_logits, c3d_logits = self.branch_logits(f)
        return self.fusion[0] * rnn_logits + self.fusion[1] * c3d_logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def load_frame_weights(self, checkpoint: Mapping[str, Any]) -> None:
        """Load image-model weights into the frame CNN (a checkpoint dict or a bare state dict)."""
        state = checkpoint.get("state_dict", checkpoint)
        spec = checkpoint.get("spec")
        if isinstance(spec, Mapping) and spec.get("arch") != self.frame_arch:
            raise ValueError(f"image checkpoint is {spec.get('arch')!r}, the frame CNN is {self.frame_arch!r}")
        self.frame_cnn.load_state_dict(state)


def with_frame_network(spec: ModelSpec, image_spec: Mapping[str, Any]) -> ModelSpec:
    """A copy of video spec ``spec`` whose frame network is the image checkpoint's (its arch,
    input size, channels, mean/std and face margin), so that its weights load."""
    out = ModelSpec.from_dict(spec.to_dict())
    out.extra = {**out.extra, "frame_arch": image_spec["arch"]}
    out.input_size, out.channels = int(image_spec["input_size"]), int(image_spec["channels"])
    out.mean, out.std = tuple(image_spec["mean"]), tuple(image_spec["std"])
    out.face_margin = float(image_spec.get("face_margin") or 0.0)
    return out


_HYBRID_DEFAULTS = {"frame_arch": "emo_resnet_s", "hidden": 128, "bidirectional": True,
                    "c3d_widths": [16, 32, 64, 128]}


@register_model(ModelSpec(arch="emo_video_hybrid", task="video", input_size=48, channels=1, mean=(0.5,),
                          std=(0.5,), labels=LABELS, clip_len=16, extra=dict(_HYBRID_DEFAULTS)))
def emo_video_hybrid(spec: ModelSpec, **kw) -> nn.Module:
    """Hybrid video network over 16 48x48 grayscale face crops; options in ``spec.extra`` over
    the defaults (the spec it is given is left as it is: clips are ``(N, C, T, S, S)``, the
    layout ``export.torchscript.example_input`` assumes for a spec with ``clip_len``)."""
    opts = {**_HYBRID_DEFAULTS, **spec.extra}
    return HybridVideoNet(spec, frame_arch=opts["frame_arch"], hidden=int(opts["hidden"]),
                          bidirectional=bool(opts["bidirectional"]),
                          c3d_widths=tuple(int(w) for w in opts["c3d_widths"]), **kw)


# --- the per-frame video model ----------------------------------------------------------------
# Spec keys of a per-frame video model that are not the frame network's own (everything else in
# ``extra``, e.g. a calibrated temperature or mirror averaging, belongs to the frame network).
FRAME_VIDEO_KEYS = ("frame_arch", "frame_model", "input_shape", "pooling", "pooling_params", "sample_fps",
                    "max_sampled")


def frame_spec_of(spec: ModelSpec) -> ModelSpec:
    """The image spec of a per-frame video model's frame network."""
    extra = {k: v for k, v in spec.extra.items() if k not in FRAME_VIDEO_KEYS}
    return ModelSpec(arch=spec.extra["frame_arch"], task="image", input_size=spec.input_size,
                     channels=spec.channels, mean=spec.mean, std=spec.std, labels=spec.labels,
                     face_margin=spec.face_margin, extra=extra)


def video_spec_from_image(image_spec: ModelSpec, clip_len: int = 16, **video_extra: Any) -> ModelSpec:
    """The spec of a per-frame video model over the image network ``image_spec``: its arch,
    input size, channels, mean/std, margin and every ``extra`` (temperature, mirror averaging,
    ...) carry over; ``video_extra`` adds the video options (pooling, sampling)."""
    extra = {**image_spec.extra, **video_extra, "frame_arch": image_spec.arch, "frame_model": True,
             "input_shape": [image_spec.channels, image_spec.input_size, image_spec.input_size]}
    return ModelSpec(arch="emo_video_frames", task="video", input_size=image_spec.input_size,
                     channels=image_spec.channels, mean=image_spec.mean, std=image_spec.std,
                     labels=image_spec.labels, clip_len=clip_len, face_margin=image_spec.face_margin,
                     extra=extra)


@register_model(video_spec_from_image(default_spec("emo_resnet_s")))
def emo_video_frames(spec: ModelSpec, **kw) -> nn.Module:
    """The image network named by ``spec.extra["frame_arch"]``, run on each sampled frame's face;
    the clip's answer is pooled from the frames (``spec.extra["pooling"]``). Its weights are the
    image checkpoint's own (``training.video_from_image``)."""
    return create_model(spec.extra["frame_arch"], frame_spec_of(spec), **kw)
