"""End to end: TorchServe's explanations API (REST ``POST /explanations/<model>`` and gRPC
``Explanations``) on both archives, from the shipped weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from export.__main__ import main as export_main
from model_defs import LABELS, SHIPPED_WEIGHTS
from serving import running_server
from serving.grpc_client import explain as grpc_explain
from tests.test_video_handler import video_checkpoint
from tests.tsserver import image_weights, send_together

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FIXTURES = Path(__file__).parent / "fixtures"
GROUP = FIXTURES / "photos" / "group.jpg"
SINGLE = FIXTURES / "photos" / "single_face.jpg"
CLIP = FIXTURES / "video" / "mead_happy_1s_128.mp4"
BATCH_DELAY_MS = 300  # concurrent test requests share a batch


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explain-e2e")
    store = tmp / "model_store"
    video = SHIPPED_WEIGHTS["video"] if SHIPPED_WEIGHTS["video"].is_file() else video_checkpoint(tmp / "v.pth")
    for task, ckpt in (("image", image_weights(tmp)), ("video", video)):
        assert export_main(["--task", task, "--checkpoint", str(ckpt), "--out", str(store), "--workers", "1",
                            "--max-batch-delay", str(BATCH_DELAY_MS), "--batch-size", "4"]) == 0
    with running_server(store, ["emotion_image=emotion_image.mar", "emotion_video=emotion_video.mar"],
                        tmp / "server") as ts:
        yield ts


def call(ts, api: str, model: str, content_type: str | None = None, **kwargs) -> requests.Response:
    headers = {**ts.auth(), **({"Content-Type": content_type} if content_type else {})}
    return requests.post(f"{ts.inference_url}/{api}/{model}", headers=headers, timeout=120, **kwargs)


def test_group_photo_gets_one_map_per_face(server):
    predicted = call(server, "predictions", "emotion_image", data=GROUP.read_bytes()).json()
    r = call(server, "explanations", "emotion_image", data=GROUP.read_bytes())
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
    answer = r.json()
    assert len(answer["faces"]) == len(predicted["faces"]) >= 4
    for face, plain in zip(answer["faces"], predicted["faces"]):
        e = face.pop("explanation")
        assert face == plain
        assert e["label"] == face["top3"][0]["label"] and len(e["map"]) == e["grid"] == 16
        assert all(len(row) == 16 and all(0 <= v <= 1 for v in row) for row in e["map"])
        assert max(max(row) for row in e["map"]) == 1.0 and len(e["corners"]) == 4


def test_a_label_named_in_the_request(server):
    r = call(server, "explanations", "emotion_image", files={"data": SINGLE.read_bytes()}, data={"target": "sad"})
    assert r.status_code == 200, r.text
    assert r.json()["faces"][0]["explanation"]["label"] == "sad"


@pytest.mark.parametrize("body,kwargs", [
    (b"not an image", {}), (SINGLE.read_bytes()[:3000], {}), (b"", {"headers_ct": "image/jpeg"}),
    (None, {"json": {"data": "%%%"}}), (None, {"files": {"data": b"x"}, "data": {"max_faces": "0"}})])
def test_bad_input_gets_the_same_4xx_as_predictions(server, body, kwargs):
    kw = dict(kwargs)
    headers = {**server.auth(), **({"Content-Type": kw.pop("headers_ct")} if "headers_ct" in kw else {})}
    if body is not None:
        kw["data"] = body
    want = requests.post(server.predictions_url("emotion_image"), headers=headers, timeout=60, **kw)
    got = requests.post(f"{server.inference_url}/explanations/emotion_image", headers=headers, timeout=60, **kw)
    assert 400 <= want.status_code < 500 and got.status_code == want.status_code
    assert got.json() == want.json() and set(got.json()) == {"code", "type", "message"}


def test_predictions_and_explanations_in_one_batch(server):
    body = SINGLE.read_bytes()
    apis = ["predictions", "explanations", "predictions", "explanations"]
    out = send_together(lambda api: call(server, api, "emotion_image", data=body), apis)
    assert [r.status_code for r in out] == [200] * 4
    assert ["explanation" in r.json()["faces"][0] for r in out] == [a == "explanations" for a in apis]


def test_grpc_explanations(server):
    """TorchServe 0.12 has no gRPC Explanations RPC: Predictions with ``explain=true`` answers the same."""
    rest = call(server, "explanations", "emotion_image", data=GROUP.read_bytes()).json()
    assert grpc_explain(server.grpc_inference, "emotion_image", GROUP.read_bytes(), server.keys["inference"]) == rest
    sad = grpc_explain(server.grpc_inference, "emotion_image", SINGLE.read_bytes(), server.keys["inference"], label="sad")
    assert sad["faces"][0]["explanation"]["label"] == "sad"
    bad = grpc_explain(server.grpc_inference, "emotion_image", SINGLE.read_bytes(), server.keys["inference"],
                       label="bored")
    assert bad["code"] == 400 and "target" in bad["message"]


def test_video_explanations_name_the_frames_that_weighed_most(server):
    predicted = call(server, "predictions", "emotion_video", data=CLIP.read_bytes(),
                     content_type="video/mp4").json()
    r = call(server, "explanations", "emotion_video", data=CLIP.read_bytes(),
             content_type="video/mp4")
    assert r.status_code == 200, r.text
    answer = r.json()
    (person,) = answer["people"]
    frames = person.pop("explanation")
    assert answer == predicted
    assert 1 <= len(frames) <= 3 and [f["weight"] for f in frames] == sorted((f["weight"] for f in frames), reverse=True)
    for f in frames:
        assert f["explanation"]["label"] == person["top3"][0]["label"] in LABELS
        assert 0 <= f["time"] <= answer["duration"] and len(f["explanation"]["map"]) == 16
    bad = call(server, "explanations", "emotion_video", data=b"not a video",
               content_type="video/mp4")
    assert bad.status_code == 415 and json.loads(bad.text)["code"] == 415
