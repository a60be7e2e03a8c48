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
from ts.context import Context, RequestProcessor

from export.__main__ import main as export_main
from handlers import common
from handlers.image_handler import EmotionImageHandler
from handlers.preprocess import InputError
from model_defs import LABELS, create_model, save_weights

FACES = Path(__file__).parent / "fixtures" / "faces"


class _Metrics:
    def add_time(self, *args, **kwargs) -> None:
        pass


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


def make_context(model_dir: Path, n: int) -> Context:
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    import yaml

    cfg = yaml.safe_load((model_dir / "model-config.yaml").read_text())
    ctx = Context("emotion_image", str(model_dir), manifest, 8, None, "0.12.0",
                  metrics=_Metrics(), model_yaml_config=cfg)
    ctx.request_processor = [RequestProcessor({}) for _ in range(n)]
    return ctx


@pytest.fixture(scope="module")
def handler(model_dir) -> EmotionImageHandler:
    h = EmotionImageHandler()
    h.initialize(make_context(model_dir, 1))
    return h


def run(handler: EmotionImageHandler, model_dir: Path, rows: list) -> tuple[list, list[int]]:
    ctx = make_context(model_dir, len(rows))
    out = handler.handle(rows, ctx)
    return out, [ctx.get_response_status(i)[0] for i in range(len(rows))]


def face_bytes(cls: str = "happy", fmt: str = "JPEG", **save) -> bytes:
    path = sorted((FACES / cls).glob("*.jpg"))[0]
    if fmt == "JPEG" and not save:
        return path.read_bytes()
    buf = io.BytesIO()
    Image.open(path).save(buf, fmt, **save)
    return buf.getvalue()


def assert_answer(answer: dict, size: tuple[int, int]) -> None:
    assert list(answer) == ["faces"] and len(answer["faces"]) == 1
    face = answer["faces"][0]
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
    assert_answer(got[0], Image.open(path).size)


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
assert "handlers" not in sys.modules
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", script], cwd=model_dir, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
