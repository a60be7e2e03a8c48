"""Explanations in process: the attribution methods against Captum's, the image handler's
``explain_handle`` (maps, corners, targets, errors as for predictions) and the faithfulness of
the served maps on real faces (deleting the most-attributed 10% must hurt more than random 10%)."""
from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from ts.context import RequestProcessor

from handlers import explain, faces
from handlers.image_handler import EmotionImageHandler
from model_defs import LABELS, create_model
from tests.explain_faces import crop_files, fixture_inputs
from tests.handler_context import extracted_archive, make_context
from tests.tsserver import image_weights

SCENES = Path(__file__).parent / "fixtures" / "photos"
MARGIN = 0.1  # mean probability drop beyond random deletion (measured: +0.28, bench/bench_explain.py)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An extracted emotion_image.mar of the shipped weights."""
    tmp = tmp_path_factory.mktemp("explain")
    return extracted_archive("image", image_weights(tmp), tmp)


@pytest.fixture(scope="module")
def handler(model_dir) -> EmotionImageHandler:
    h = EmotionImageHandler()
    h.initialize(make_context(model_dir, 1))
    return h


def explain_rows(handler, model_dir, rows: list, explain_flags: list[bool] | None = None) -> tuple[list, list[int]]:
    """``handler.handle`` on one batch whose requests came in through /explanations (or as flagged)."""
    flags = explain_flags or [True] * len(rows)
    ctx = make_context(model_dir, len(rows))
    ctx.request_processor = [RequestProcessor({"explain": "True"} if f else {}) for f in flags]
    out = handler.handle(rows, ctx)
    return out, [ctx.get_response_status(i)[0] for i in range(len(rows))]


# --- the methods ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    return create_model("emo_resnet_s").eval()


def test_occlusion_and_integrated_gradients_match_captum(small_net):
    from captum.attr import IntegratedGradients, Occlusion

    x = torch.randn(2, 1, 48, 48, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 3])
    prob = lambda inp: torch.softmax(small_net(inp), 1)  # noqa: E731
    occ = Occlusion(prob).attribute(x, target=target, sliding_window_shapes=(1, 12, 12), strides=(1, 6, 6),
                                    baselines=0.0)
    ours = explain.attribute(small_net, x, target, "occlusion", 8, window=2)
    assert torch.allclose(ours, explain.to_map(explain.pool_to_grid(occ, 8)), atol=3e-3)
    ig = IntegratedGradients(prob).attribute(x, target=target, baselines=0.0, n_steps=8, method="riemann_middle")
    ours = explain.attribute(small_net, x, target, "integrated_gradients", 8, steps=8)
    assert torch.allclose(ours, explain.to_map(explain.pool_to_grid(ig, 8)), atol=3e-3)


@pytest.mark.parametrize("method", explain.METHODS)
def test_every_method_gives_a_map_in_0_1_per_face(small_net, method):
    x = torch.randn(2, 1, 48, 48, generator=torch.Generator().manual_seed(2))
    maps = explain.attribute(small_net, x, torch.tensor([1, 4]), method, 16)
    assert maps.shape == (2, 16, 16) and maps.min() >= 0 and maps.amax(dim=(1, 2)).tolist() == [1.0, 1.0]


def test_crop_corners_are_where_align_face_cuts():
    """The corners say where the aligned crop lies in the photo: the photo's pixels mapped
    through them (inverse) give back the crop ``align_face`` produced."""
    photo = Image.open(SCENES / "group.jpg").convert("L")
    face = faces.FaceDetector().detect([photo.convert("RGB")])[0][0]
    size = 64
    crop = np.asarray(faces.align_face(photo, face, size), np.float64)
    (x0, y0), (x1, y1), _, (x3, y3) = explain.crop_corners(face, face.box, size, None)
    u, v = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
    px = x0 + (x1 - x0) * u / size + (x3 - x0) * v / size
    py = y0 + (y1 - y0) * u / size + (y3 - y0) * v / size
    pixels = np.asarray(photo, np.float64)
    rows = np.clip(np.floor(py).astype(int), 0, photo.height - 1)
    cols = np.clip(np.floor(px).astype(int), 0, photo.width - 1)
    resampled = pixels[rows, cols]
    assert np.abs(resampled - crop).mean() < 12  # nearest-pixel resampling of a bilinear crop
    assert np.abs(np.roll(resampled, 6, axis=1) - crop).mean() > 2 * np.abs(resampled - crop).mean()
    whole = explain.crop_corners(None, [0, 0, 48, 40], size, None)
    assert whole == [[0, 0], [48, 0], [48, 40], [0, 40]]


# --- the handler ---------------------------------------------------------------------------------
def test_explanations_answer_one_map_per_face_of_the_group_photo(handler, model_dir):
    body = (SCENES / "group.jpg").read_bytes()
    (predicted,), _ = explain_rows(handler, model_dir, [{"body": body}], [False])
    (answer,), status = explain_rows(handler, model_dir, [{"body": body}])
    assert status == [200] and len(answer["faces"]) == len(predicted["faces"]) >= 4
    for face, plain in zip(answer["faces"], predicted["faces"]):
        e = face.pop("explanation")
        assert face == plain  # the prediction's answer, plus the map
        assert e["label"] == face["top3"][0]["label"] and e["method"] == "occlusion" and e["grid"] == 16
        cells = np.array(e["map"])
        assert cells.shape == (16, 16) and cells.min() >= 0 and cells.max() == 1.0
        corners = np.array(e["corners"])
        x1, y1, x2, y2 = face["box"]  # the crop holds the face's box centre
        inside = corners.min(0) <= [(x1 + x2) / 2, (y1 + y2) / 2]
        assert inside.all() and (corners.max(0) >= [(x1 + x2) / 2, (y1 + y2) / 2]).all()


def test_a_named_label_is_explained(handler, model_dir):
    body = (SCENES / "single_face.jpg").read_bytes()
    rows = [{"body": body}, {"body": body, "target": b"sad"}, {"body": {"data": base64.b64encode(body).decode(), "target": "3"}},
            {"body": body, "label": "surprise"}]
    out, status = explain_rows(handler, model_dir, rows)
    assert status == [200] * 4
    labels = [a["faces"][0]["explanation"]["label"] for a in out]
    assert labels == [out[0]["faces"][0]["top3"][0]["label"], "sad", LABELS[3], "surprise"]
    assert out[1]["faces"][0]["explanation"]["map"] != out[3]["faces"][0]["explanation"]["map"]


@pytest.mark.parametrize("target", [b"bored", "7", "-1", ""])
def test_a_bad_target_fails_alone_with_400(handler, model_dir, target):
    body = (SCENES / "single_face.jpg").read_bytes()
    out, status = explain_rows(handler, model_dir, [{"body": body}, {"body": body, "target": target}])
    assert status == [200, 400] and "target must be one of" in out[1]["message"]


def test_bad_input_gets_the_same_4xx_as_predictions(handler, model_dir):
    good = (SCENES / "single_face.jpg").read_bytes()
    rows = [{"body": good}, {"body": good[: len(good) // 3]}, {"body": b"not an image"}, {"body": b""},
            {"body": good, "detection": b"sometimes"}, {"body": good, "max_faces": "0"}]
    predicted, want = explain_rows(handler, model_dir, rows, [False] * len(rows))
    explained, got = explain_rows(handler, model_dir, rows)
    assert got == want == [200, 400, 415, 400, 400, 400]
    assert explained[1:] == predicted[1:]
    assert "explanation" in explained[0]["faces"][0] and "explanation" not in predicted[0]["faces"][0]


def test_a_batch_mixing_predictions_and_explanations(handler, model_dir):
    """BaseHandler picks the path by the first request only: either way, each request gets its kind."""
    body = (SCENES / "single_face.jpg").read_bytes()
    for flags in ([False, True, False], [True, False, True]):
        out, status = explain_rows(handler, model_dir, [{"body": body}] * 3, flags)
        assert status == [200] * 3
        assert ["explanation" in a["faces"][0] for a in out] == flags


# --- faithfulness ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served_maps(handler, model_dir):
    """The fixture faces (FER2013 crops, classified whole), the handler's label for each and the
    maps its explanations answer."""
    files = crop_files()
    assert len(files) >= 20
    out, status = explain_rows(handler, model_dir, [{"body": p.read_bytes()} for p in files])
    assert status == [200] * len(files)
    x = fixture_inputs(handler.spec)
    target = torch.tensor([LABELS.index(a["faces"][0]["explanation"]["label"]) for a in out])
    maps = torch.tensor([a["faces"][0]["explanation"]["map"] for a in out])
    random_drop = explain.random_drop(handler.model, x, target, 0.1)
    return x, target, maps, random_drop


def margin(handler, served_maps, maps: torch.Tensor) -> float:
    """Mean drop of the top label's probability when deleting the 10% of pixels ``maps`` rates
    highest, beyond deleting 10% random pixels."""
    x, target, _, random_drop = served_maps
    return (explain.deletion_drop(handler.model, x, target, maps, 0.1) - random_drop).mean().item()


def test_served_maps_are_faithful_on_real_faces(handler, served_maps):
    assert margin(handler, served_maps, served_maps[2]) > MARGIN


def test_random_constant_and_background_maps_fail_the_faithfulness_check(handler, served_maps):
    maps = served_maps[2]
    g = torch.Generator().manual_seed(3)
    random = torch.rand(maps.shape, generator=g)
    constant = torch.ones_like(maps)
    border = torch.ones_like(maps)
    border[:, 3:-3, 3:-3] = 0  # the crop's edge: background, hair, the crop border
    shuffled = maps[torch.roll(torch.arange(len(maps)), 1)]  # another face's map
    for name, bad in [("random", random), ("constant", constant), ("border", border)]:
        assert margin(handler, served_maps, bad) < MARGIN, name
    assert margin(handler, served_maps, shuffled) < margin(handler, served_maps, maps)
