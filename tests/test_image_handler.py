"""The image handler's stages under a TorchServe-like context, without a server."""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from export.__main__ import main as export_main
from handlers import common
from handlers.image_handler import EmotionImageHandler
from handlers.preprocess import InputError
from model_defs import LABELS, create_model, save_weights
from tests.handler_context import make_context, run_handler as run

FACES = Path(__file__).parent / "fixtures" / "faces"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An extracted emotion_image.mar built from random weights."""
    tmp = tmp_path_factory.mktemp("mar")
    torch.manual_seed(0)
    save_weights(create_model("emo_resnet_s"), tmp / "random.pth")
    assert export_main(["--task", "image", "--checkpoint", str(tmp / "random.pth"), "--out", str(tmp)]) == 0
    out = tmp / "model"
    with zipfile.ZipFile(tmp / "emotion_image.mar") as z:
        z.extractall(out)
    return out


@pytest.fixture(scope="module")
def handler(model_dir) -> EmotionImageHandler:
    h = EmotionImageHandler()
    h.initialize(make_context(model_dir, 1))
    return h


def face_bytes(cls: str = "happy", fmt: str = "JPEG", **save) -> bytes:
    path = sorted((FACES / cls).glob("*.jpg"))[0]
    if fmt == "JPEG" and not save:
        return path.read_bytes()
    buf = io.BytesIO()
    Image.open(path).save(buf, fmt, **save)
    return buf.getvalue()


def assert_answer(answer: dict, size: tuple[int, int]) -> None:
    assert list(answer) == ["faces", "detection"] and len(answer["faces"]) == 1
    assert answer["detection"] == {"mode": "auto", "faces_detected": 0, "whole_image": True}
    face = answer["faces"][0]
    assert list(face) == ["box", "detected", "top3"]
    assert face["box"] == [0, 0, *size] and face["detected"] is False
    probs = [t["probability"] for t in face["top3"]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True)
    assert all(0 <= p <= 1 for p in probs) and sum(probs) <= 1 + 1e-5
    labels = [t["label"] for t in face["top3"]]
    assert len(set(labels)) == 3 and set(labels) <= set(LABELS)


def test_spec_and_labels_come_from_the_archive(handler, model_dir):
    index = json.loads((model_dir / "index_to_name.json").read_text())
    assert handler.labels == [index[str(i)] for i in range(len(index))] == list(LABELS)
    assert handler.spec["input_size"] == 48 and handler.spec["channels"] == 1
    assert handler.device == torch.device("cpu") and handler.topk == 3
    assert (handler.detection, handler.min_face_size, handler.max_faces) == ("auto", 20, 20)
    assert handler.input_size == 48 and handler.channels == 1


def test_one_bad_request_fails_alone(handler, model_dir):
    good = face_bytes()
    truncated = good[: len(good) // 2]
    rows = [{"body": good}, {"body": truncated}, {"body": b"not an image"}, {"body": b""},
            {"body": {"data": "%%% not base64"}}, {"data": good}]
    out, status = run(handler, model_dir, rows)
    assert len(out) == len(rows)
    assert status == [200, 400, 415, 400, 400, 200]
    for i in (1, 2, 3, 4):
        assert set(out[i]) == {"code", "type", "message"} and out[i]["code"] == status[i]
        assert out[i]["message"]
    assert_answer(out[0], (48, 48))
    assert out[0] == out[5]


def test_all_requests_bad_still_answers_each(handler, model_dir):
    out, status = run(handler, model_dir, [{"body": b"x"}, {"body": b"y"}])
    assert status == [415, 415] and [o["code"] for o in out] == [415, 415]


def test_batch_equals_single_requests(handler, model_dir):
    images = [p.read_bytes() for p in sorted(FACES.glob("*/*.jpg"))[:5]]
    batched, _ = run(handler, model_dir, [{"body": b} for b in images])
    singles = [run(handler, model_dir, [{"body": b}])[0][0] for b in images]
    for a, b in zip(batched, singles):
        pa = [t["probability"] for t in a["faces"][0]["top3"]]
        pb = [t["probability"] for t in b["faces"][0]["top3"]]
        assert [t["label"] for t in a["faces"][0]["top3"]] == [t["label"] for t in b["faces"][0]["top3"]]
        assert pa == pytest.approx(pb, abs=1e-5)


@pytest.mark.parametrize("row", [
    lambda b: {"body": b},                                                   # raw body
    lambda b: {"data": b},                                                   # gRPC input / form field "data"
    lambda b: {"image": b},                                                  # multipart field "image"
    lambda b: {"upload": b},                                                 # multipart, any single field
    lambda b: {"body": {"data": base64.b64encode(b).decode()}},             # JSON {"data": b64}
    lambda b: {"body": {"image": base64.b64encode(b).decode()}},            # JSON {"image": b64}
    lambda b: {"body": json.dumps({"data": base64.b64encode(b).decode()}).encode()},  # JSON, no content type
    lambda b: {"data": "data:image/jpeg;base64," + base64.b64encode(b).decode()},     # data URI text field
], ids=["raw", "data", "image-field", "other-field", "json-data", "json-image", "json-bytes", "data-uri"])
def test_body_forms_give_the_same_answer(handler, model_dir, row):
    img = face_bytes()
    want, _ = run(handler, model_dir, [{"body": img}])
    got, status = run(handler, model_dir, [row(img)])
    assert status == [200] and got == want


def test_extract_body_errors():
    with pytest.raises(InputError, match="no payload"):
        common.extract_body({"a": b"1", "b": b"2"})
    with pytest.raises(InputError, match="base64"):
        common.extract_body({"body": {"image": 12}}, ("image",))
    with pytest.raises(InputError, match="empty"):
        common.extract_body({"body": b""})


@pytest.mark.parametrize("fmt,save", [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True}),
                                      ("GIF", {})])
def test_image_formats(handler, model_dir, fmt, save):
    """Lossless encodings of the same pixels give the same answer (GIF: same grey palette)."""
    want, _ = run(handler, model_dir, [{"body": face_bytes(fmt="PNG")}])
    got, status = run(handler, model_dir, [{"body": face_bytes(fmt=fmt, **save)}])
    assert status == [200]
    assert_answer(got[0], (48, 48))
    assert got == want


def test_animated_gif_uses_first_frame(handler, model_dir):
    path = sorted((FACES / "happy").glob("*.jpg"))[0]
    first = Image.open(path).convert("L")
    other = Image.open(sorted((FACES / "angry").glob("*.jpg"))[0]).convert("L")
    buf = io.BytesIO()
    first.save(buf, "GIF", save_all=True, append_images=[other], duration=100)
    got, status = run(handler, model_dir, [{"body": buf.getvalue()}])
    want, _ = run(handler, model_dir, [{"body": face_bytes(fmt="PNG")}])
    assert status == [200] and got == want


def test_exif_orientation_is_applied(handler, model_dir):
    img = Image.open(sorted((FACES / "happy").glob("*.jpg"))[0]).convert("RGB").resize((60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    got, status = run(handler, model_dir, [{"body": buf.getvalue()}])
    assert status == [200]
    assert_answer(got[0], (40, 60))  # the box is in the displayed (rotated) frame


def test_colour_photo(handler, model_dir):
    path = sorted((Path(__file__).parent / "fixtures" / "colour").glob("*.jpg"))[0]
    got, status = run(handler, model_dir, [{"body": path.read_bytes()}])
    assert status == [200]
    # a 250x250 colour news photo: a photo of a person, so its face is found and aligned
    assert got[0]["detection"] == {"mode": "auto", "faces_detected": 1, "whole_image": False}
    (face,) = got[0]["faces"]
    assert face["detected"] and face["box"] != [0, 0, *Image.open(path).size]
    assert_top3(face)


def test_topk_format():
    top = common.topk([0.1, 0.5, 0.05, 0.2, 0.1, 0.05, 0.0], list(LABELS), 3)
    assert top == [{"label": "disgust", "probability": 0.5}, {"label": "happy", "probability": 0.2},
                   {"label": "angry", "probability": 0.1}]


def test_error_body():
    assert common.error_body(413, "too big") == {"code": 413, "type": "RequestEntityTooLarge", "message": "too big"}


def test_handler_imports_flat_inside_the_archive(model_dir):
    """Inside a .mar the handler and shared modules sit flat in one folder: it must load there."""
    script = f"""
import json, sys
sys.path.insert(0, {str(model_dir)!r})
sys.path = [p for p in sys.path if p not in ("", {str(Path.cwd())!r}, {str(Path(__file__).resolve().parents[1])!r})]
import image_handler
assert image_handler.common.__name__ == "common", image_handler.common.__name__
assert image_handler.faces.__name__ == "faces", image_handler.faces.__name__
from ts.utils.util import list_classes_from_module  # TorchServe's own rule: one class
assert list_classes_from_module(image_handler) == [image_handler.EmotionImageHandler]
assert "handlers" not in sys.modules
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", script], cwd=model_dir, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


# --- face detection in the handler ---------------------------------------------------------

PHOTOS = Path(__file__).parent / "fixtures" / "photos"


def photo_bytes(name: str) -> bytes:
    return (PHOTOS / name).read_bytes()


def box_size(box) -> float:
    return ((box[2] - box[0]) * (box[3] - box[1])) ** 0.5


def assert_top3(face: dict) -> None:
    probs = [t["probability"] for t in face["top3"]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True)
    assert {t["label"] for t in face["top3"]} <= set(LABELS)


class CountingDetector:
    """Wraps the real detector: counts ``detect`` calls and images; can fail on chosen sizes."""

    def __init__(self, real, fail_sizes=()) -> None:
        self.real, self.fail_sizes, self.calls = real, set(fail_sizes), []

    def detect(self, images):
        self.calls.append([img.size for img in images])
        if any(img.size in self.fail_sizes for img in images):
            raise RuntimeError("detector broke")
        return self.real.detect(images)


@pytest.fixture
def counting(handler):
    real = handler.detector()
    yield lambda fail_sizes=(): setattr(handler, "_detector", CountingDetector(real, fail_sizes)) \
        or handler._detector
    handler._detector = real


def test_group_photo_one_entry_per_face_sorted_by_size(handler, model_dir):
    from tests.test_faces import GROUP_BOXES, GROUP_PROFILE_BOX, GROUP_SMALL_BOX, iou

    (answer,), status = run(handler, model_dir, [{"body": photo_bytes("group.jpg")}])
    assert status == [200]
    found = answer["faces"]
    assert answer["detection"] == {"mode": "auto", "faces_detected": len(found), "whole_image": False}
    for expected in GROUP_BOXES:  # every verified face is there, in original pixels
        assert max(iou(f["box"], expected) for f in found) >= 0.5, expected
    extra = [f["box"] for f in found if max(iou(f["box"], e) for e in GROUP_BOXES) < 0.5]
    assert all(max(iou(b, GROUP_SMALL_BOX), iou(b, GROUP_PROFILE_BOX)) >= 0.5 for b in extra), extra
    assert iou(found[0]["box"], GROUP_BOXES[0]) >= 0.5  # largest first
    sizes = [box_size(f["box"]) for f in found]
    assert sizes == sorted(sizes, reverse=True)
    for f in found:
        assert list(f) == ["box", "detected", "score", "landmarks", "top3"]
        assert f["detected"] is True and 0.8 <= f["score"] <= 1.0  # RetinaFace keeps >= 0.8
        assert len(f["landmarks"]) == 5 and all(len(p) == 2 for p in f["landmarks"])
        x1, y1, x2, y2 = f["box"]
        cx, cy = sum(p[0] for p in f["landmarks"]) / 5, sum(p[1] for p in f["landmarks"]) / 5
        assert x1 <= cx <= x2 and y1 <= cy <= y2
        assert_top3(f)


def test_single_face_box_and_tight_photo(handler, model_dir):
    from tests.test_faces import SINGLE_BOX, iou

    out, status = run(handler, model_dir, [{"body": photo_bytes("single_face.jpg")},
                                           {"body": photo_bytes("photo_tight.jpg")}])
    assert status == [200, 200]
    (face,) = out[0]["faces"]
    assert face["detected"] and iou(face["box"], SINGLE_BOX) >= 0.5
    # A news photo that the face fills is still a photo: its face is found and aligned.
    assert out[1]["faces"][0]["detected"] is True and out[1]["faces"][0]["box"] != [0, 0, 350, 350]
    assert out[1]["detection"] == {"mode": "auto", "faces_detected": 1, "whole_image": False}


def test_no_face_image(handler, model_dir):
    body = photo_bytes("no_face.jpg")
    out, status = run(handler, model_dir, [{"body": body}, {"body": body, "detection": b"always"},
                                           {"body": body, "detection": "never"}])
    assert status == [200, 200, 200]
    assert_answer(out[0], (480, 270))  # auto: whole image, detected false
    assert out[1] == {"faces": [], "detection": {"mode": "always", "faces_detected": 0, "whole_image": False}}
    assert out[2]["faces"] == out[0]["faces"]
    assert out[2]["detection"] == {"mode": "never", "faces_detected": 0, "whole_image": True}


def test_tight_48px_crop_is_classified_whole_without_detection(handler, model_dir, counting):
    det = counting()
    out, status = run(handler, model_dir, [{"body": face_bytes("surprise")}])
    assert status == [200]
    assert_answer(out[0], (48, 48))
    assert det.calls == []  # a 48x48 input is a face crop already: MTCNN does not run


def test_detection_runs_once_per_batch(handler, model_dir, counting):
    det = counting()
    bodies = [photo_bytes(n) for n in ("group.jpg", "single_face.jpg", "no_face.jpg", "photo_tight.jpg")]
    out, status = run(handler, model_dir, [{"body": b} for b in bodies + [face_bytes()]])
    assert status == [200] * 5
    assert det.calls == [[(800, 450), (640, 360), (480, 270), (350, 350)]]  # one call, 48x48 skipped
    singles = [run(handler, model_dir, [{"body": b}])[0][0] for b in bodies]
    for got, want in zip(out, singles):
        assert [f["box"] for f in got["faces"]] == [f["box"] for f in want["faces"]]
        for g, w in zip(got["faces"], want["faces"]):
            assert [t["probability"] for t in g["top3"]] == pytest.approx(
                [t["probability"] for t in w["top3"]], abs=1e-5)


def test_per_request_options(handler, model_dir):
    group = photo_bytes("group.jpg")
    b64 = base64.b64encode(group).decode()
    rows = [{"body": group},
            {"body": group, "max_faces": b"2"},                                   # form field / gRPC input
            {"body": {"image": b64, "detection": "never"}},                        # JSON fields
            {"body": json.dumps({"data": b64, "max_faces": 1}).encode()},         # JSON, no content type
            {"data": group, "detection": "ALWAYS", "max_faces": "3"}]             # gRPC / multipart
    out, status = run(handler, model_dir, rows)
    assert status == [200] * 5
    full = out[0]["faces"]
    assert len(full) >= 4
    assert out[1]["faces"] == full[:2] and out[3]["faces"] == full[:1] and out[4]["faces"] == full[:3]
    assert out[2]["faces"][0]["box"] == [0, 0, 800, 450] and len(out[2]["faces"]) == 1
    assert out[2]["detection"]["mode"] == "never" and out[4]["detection"]["mode"] == "always"


@pytest.mark.parametrize("option", [
    {"detection": b"sometimes"}, {"detection": ""}, {"max_faces": b"0"}, {"max_faces": "21"},
    {"max_faces": "two"}, {"max_faces": 2.5}, {"max_faces": True}, {"max_faces": -1}])
def test_bad_options_fail_alone_with_400(handler, model_dir, option):
    good = photo_bytes("single_face.jpg")
    out, status = run(handler, model_dir, [{"body": good}, {"body": good, **option},
                                           {"body": {"image": base64.b64encode(good).decode(), **option}}])
    assert status == [200, 400, 400]
    key = next(iter(option))
    assert out[1]["code"] == 400 and key in out[1]["message"] and out[1] == out[2]
    assert out[0]["faces"][0]["detected"] is True


def test_detection_failure_fails_only_that_image(handler, model_dir, counting):
    det = counting(fail_sizes={(480, 270)})
    rows = [{"body": photo_bytes("single_face.jpg")}, {"body": photo_bytes("no_face.jpg")},
            {"body": face_bytes()}]
    out, status = run(handler, model_dir, rows)
    assert status == [200, 500, 200]
    assert out[0]["faces"][0]["detected"] is True and out[2]["faces"][0]["box"] == [0, 0, 48, 48]
    assert out[1]["code"] == 500 and "face detection failed" in out[1]["message"]
    assert len(det.calls) == 3  # the batch, then one by one


def test_options_from_model_config(model_dir, handler):
    import copy

    ctx = make_context(model_dir, 1)
    base = copy.deepcopy(ctx.model_yaml_config)
    ctx.model_yaml_config["handler"].update(detection="never", max_faces=2, min_face_size=30)
    h = EmotionImageHandler()
    h.initialize(ctx)
    assert (h.detection, h.max_faces, h.min_face_size) == ("never", 2, 30) and h._detector is None
    group = photo_bytes("group.jpg")
    out, _ = run(h, model_dir, [{"body": group}, {"body": group, "detection": "auto"},
                                {"body": group, "max_faces": "3"}])
    assert out[0]["faces"][0]["box"] == [0, 0, 800, 450] and not out[0]["faces"][0]["detected"]
    assert len(out[1]["faces"]) == 2  # min face 30 px, at most 2
    assert all(min(f["box"][2] - f["box"][0], f["box"][3] - f["box"][1]) >= 29 for f in out[1]["faces"])
    assert out[2]["code"] == 400  # above the configured max_faces
    for bad in ({"detection": "maybe"}, {"max_faces": 0}):
        ctx = make_context(model_dir, 1)
        ctx.model_yaml_config = {**base, "handler": {**base["handler"], **bad}}
        with pytest.raises(ValueError):
            EmotionImageHandler().initialize(ctx)


def test_detector_option_from_model_config(model_dir):
    """``detector`` in the archive's handler section picks the detector (RetinaFace by default);
    an unknown name fails at start-up."""
    from handlers import faces

    for name, kind in (("mtcnn", faces.FaceDetector), ("retinaface", faces.RetinaFaceDetector)):
        h = EmotionImageHandler()
        h.initialize(make_context(model_dir, 1, {"detector": name}))
        assert isinstance(h.detector(), kind)
        (answer,), status = run(h, model_dir, [{"body": photo_bytes("single_face.jpg")}])
        assert status == [200] and answer["faces"][0]["detected"]
    with pytest.raises(ValueError, match="face detector must be one of"):
        EmotionImageHandler().initialize(make_context(model_dir, 1, {"detector": "yunet"}))


@pytest.mark.parametrize("name,mode", [("single_face.jpg", "auto"), ("group.jpg", "auto"),
                                       ("photo_tight.jpg", "auto"), ("photo_tight.jpg", "always")])
def test_evaluator_crop_equals_handler_crop(handler, name, mode):
    """``training.evaluate --detect-faces`` sees exactly the tensor the handler classifies."""
    from handlers.preprocess import decode_image, normalize, to_uint8
    from training.engine import prepare_batch
    from training.datasets import detected_face_crop

    body = photo_bytes(name)
    batch = handler.preprocess([{"body": body, "detection": mode}])
    crop = detected_face_crop(handler.spec, "cpu", mode)(decode_image(body))
    evaluated = prepare_batch(to_uint8(crop, handler.spec)[None], handler.spec)[0]  # dataset + engine
    served = normalize(torch.stack(batch[0].tensors), handler.spec)  # as in handler.inference
    assert torch.equal(evaluated, served[0])  # the largest face (first entry)
    if name == "group.jpg":
        assert not torch.equal(evaluated, served[1])


def test_a_50_megapixel_photo_trains_but_is_refused_by_serving(handler, model_dir, tmp_path):
    """The serving pixel limit is applied where a request is decoded, not globally on import:
    a 50-megapixel photo decodes for training (``image_dataset``) and is answered 413 here."""
    from training.datasets import image_dataset

    buf = io.BytesIO()
    Image.new("L", (8000, 6250), 128).save(buf, "PNG")  # 50 megapixels, 50 kB
    (tmp_path / "happy").mkdir()
    (tmp_path / "happy" / "big.png").write_bytes(buf.getvalue())
    # through a face crop (as training with face detection does), so that the test times the
    # decode, not a 50-megapixel resize
    x, label = image_dataset(tmp_path, handler.spec, face_crop=lambda img: img.resize((64, 64)))[0]
    assert tuple(x.shape) == (handler.channels, handler.input_size, handler.input_size)
    assert label == LABELS.index("happy")
    out, status = run(handler, model_dir, [{"body": buf.getvalue()}])
    assert status == [413] and "image too large" in out[0]["message"]
    assert 40_000_000 == handler.max_pixels < 50_000_000
