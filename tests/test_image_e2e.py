"""End to end: build emotion_image.mar, serve it with a real TorchServe, call REST and gRPC."""
from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
import requests
from PIL import Image

from export.__main__ import main as export_main
from model_defs import LABELS
from serving import running_server
from serving.grpc_client import predict as grpc_predict
from tests.tsserver import image_weights, send_together

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "pretrain" / "emotion_image.pth"
FIXTURES = Path(__file__).parent / "fixtures"
FACES = sorted((FIXTURES / "faces").glob("*/*.jpg"))
PHOTOS = sorted((FIXTURES / "colour").glob("*.jpg"))
SCENES = FIXTURES / "photos"  # group.jpg, single_face.jpg, no_face.jpg, photo_tight.jpg
BATCH_DELAY_MS = 300  # long enough that concurrent test requests share a batch


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """TorchServe with emotion_image.mar from the shipped weights (random ones if absent)."""
    tmp = tmp_path_factory.mktemp("e2e")
    ckpt = image_weights(tmp)
    store = tmp / "model_store"
    assert export_main(["--task", "image", "--checkpoint", str(ckpt), "--out", str(store),
                        "--max-batch-delay", str(BATCH_DELAY_MS), "--batch-size", "8",
                        "--workers", "1"]) == 0  # one worker: concurrent requests share its batch
    with running_server(store, ["emotion_image=emotion_image.mar"], tmp / "server") as ts:
        yield ts


def post(ts, **kwargs) -> requests.Response:
    return requests.post(ts.predictions_url("emotion_image"), headers=ts.auth(), timeout=60, **kwargs)


def check_answer(answer: dict, path: Path) -> None:
    """A face crop (FER 48x48) is classified whole, and the answer says so; a news photo of a
    person (250x250) gets its one face detected and aligned."""
    assert list(answer) == ["faces", "detection"] and len(answer["faces"]) == 1, answer
    face = answer["faces"][0]
    w, h = Image.open(path).size
    if max(w, h) <= 64:
        assert answer["detection"] == {"mode": "auto", "faces_detected": 0, "whole_image": True}
        assert face["box"] == [0, 0, w, h] and face["detected"] is False
    else:
        assert answer["detection"] == {"mode": "auto", "faces_detected": 1, "whole_image": False}
        x1, y1, x2, y2 = face["box"]
        assert face["detected"] is True and 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    top = face["top3"]
    labels = [t["label"] for t in top]
    probs = [t["probability"] for t in top]
    assert len(top) == 3 and len(set(labels)) == 3 and set(labels) <= set(LABELS)
    assert probs == sorted(probs, reverse=True)
    assert all(0.0 <= p <= 1.0 for p in probs) and sum(probs) <= 1.0 + 1e-5


@pytest.mark.parametrize("path", FACES + PHOTOS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_rest_answers_real_faces(server, path):
    r = post(server, data=path.read_bytes())
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    check_answer(r.json(), path)


def test_multipart_json_and_grpc_agree_with_raw_body(server):
    path = FACES[0]
    data = path.read_bytes()
    raw = post(server, data=data).json()
    multipart = post(server, files={"data": (path.name, data, "image/jpeg")})
    as_json = post(server, json={"image": base64.b64encode(data).decode()})
    assert multipart.status_code == 200 and as_json.status_code == 200
    assert multipart.json() == raw and as_json.json() == raw
    assert grpc_predict(server.grpc_inference, "emotion_image", data, server.keys["inference"]) == raw


def test_grpc_reports_a_bad_image_in_the_body(server):
    """TorchServe's gRPC frontend keeps status OK for handler-set codes: the JSON says 4xx."""
    answer = grpc_predict(server.grpc_inference, "emotion_image", b"not an image", server.keys["inference"])
    assert answer["code"] == 415 and answer["type"] == "UnsupportedMediaType"


def test_grpc_needs_the_token(server):
    import grpc

    with pytest.raises(grpc.RpcError) as e:
        grpc_predict(server.grpc_inference, "emotion_image", FACES[0].read_bytes(), "wrong-key")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_rest_needs_the_token(server):
    r = requests.post(server.predictions_url("emotion_image"), data=FACES[0].read_bytes(), timeout=30)
    assert r.status_code in (400, 401, 403) and "Token" in r.json()["message"]


def test_model_registration_is_off(server):
    r = requests.post(f"{server.management_url}/models", params={"url": "emotion_image.mar"},
                      headers=server.auth("management"), timeout=30)
    assert r.status_code == 405


def test_corrupt_image_in_a_batch_fails_alone(server):
    good = [p.read_bytes() for p in FACES[:5]]
    corrupt = good[0][: len(good[0]) // 3]  # a truncated JPEG
    bodies = good[:2] + [corrupt] + good[2:]
    responses = send_together(lambda body: post(server, data=body), bodies)
    assert [r.status_code for r in responses] == [200, 200, 400, 200, 200, 200]
    err = responses[2].json()
    assert err["code"] == 400 and err["type"] == "BadRequest" and "corrupt" in err["message"]
    for r, path in zip(responses[:2] + responses[3:], FACES[:5]):
        check_answer(r.json(), path)
    # the corrupt request really shared a batch with good ones
    log = (server.workdir / "logs" / "model_log.log").read_text()
    batches = [tuple(map(int, m)) for m in re.findall(r"batch of (\d+) requests: (\d+) faces, (\d+) failed", log)]
    assert any(n > 1 and failed == 1 and faces == n - 1 for n, faces, failed in batches), batches


@pytest.mark.skipif(not SHIPPED.is_file(), reason="pretrain/emotion_image.pth not shipped yet (random weights)")
@pytest.mark.parametrize("cls", ["happy", "surprise"])
def test_shipped_model_top1_right_for_happy_and_surprised_faces(server, cls):
    for path in sorted((FIXTURES / "faces" / cls).glob("*.jpg")):
        answer = post(server, data=path.read_bytes()).json()
        assert answer["faces"][0]["top3"][0]["label"] == cls, (path.name, answer)


# --- face detection ------------------------------------------------------------------------

def check_detected(face: dict) -> None:
    assert face["detected"] is True and 0.8 <= face["score"] <= 1.0 and len(face["landmarks"]) == 5
    assert len(face["top3"]) == 3 and {t["label"] for t in face["top3"]} <= set(LABELS)


def test_group_photo_gets_one_entry_per_face(server):
    from tests.test_faces import GROUP_BOXES, GROUP_PROFILE_BOX, GROUP_SMALL_BOX, iou

    data = (SCENES / "group.jpg").read_bytes()
    r = post(server, data=data)
    assert r.status_code == 200, r.text
    answer = r.json()
    faces = answer["faces"]
    assert answer["detection"] == {"mode": "auto", "faces_detected": len(faces), "whole_image": False}
    assert all(max(iou(f["box"], b) for f in faces[:4]) >= 0.5 for b in GROUP_BOXES)  # the four largest
    assert all(max(iou(f["box"], GROUP_SMALL_BOX), iou(f["box"], GROUP_PROFILE_BOX)) >= 0.5 for f in faces[4:]), faces[4:]
    for f in faces:
        check_detected(f)
    assert grpc_predict(server.grpc_inference, "emotion_image", data, server.keys["inference"]) == answer
    two = post(server, json={"image": base64.b64encode(data).decode(), "max_faces": 2})
    assert two.status_code == 200 and two.json()["faces"] == faces[:2]


def test_no_face_frame_and_form_options(server):
    data = (SCENES / "no_face.jpg").read_bytes()
    auto = post(server, data=data)
    assert auto.status_code == 200
    assert auto.json()["faces"][0]["box"] == [0, 0, 480, 270] and not auto.json()["faces"][0]["detected"]
    assert auto.json()["detection"]["whole_image"] is True

    def form(body: bytes, **fields) -> requests.Response:  # multipart: image + option fields
        return post(server, files={"data": ("photo.jpg", body, "image/jpeg")}, data=fields)

    always = form(data, detection="always")
    assert always.status_code == 200
    assert always.json() == {"faces": [], "detection": {"mode": "always", "faces_detected": 0,
                                                        "whole_image": False}}
    bad = form(data, detection="sometimes")
    assert bad.status_code == 400 and "detection" in bad.json()["message"]
    tight = form((SCENES / "photo_tight.jpg").read_bytes(), detection="always")
    assert tight.status_code == 200 and tight.json()["faces"][0]["detected"] is True


def test_photos_and_a_corrupt_image_in_one_batch(server):
    from tests.test_faces import SINGLE_BOX, iou

    single = (SCENES / "single_face.jpg").read_bytes()
    bodies = [(SCENES / "group.jpg").read_bytes(), FACES[0].read_bytes(), single[: len(single) // 3],
              (SCENES / "no_face.jpg").read_bytes(), single]
    responses = send_together(lambda body: post(server, data=body), bodies)
    assert [r.status_code for r in responses] == [200, 200, 400, 200, 200], [r.text for r in responses]
    group, crop, corrupt, no_face, one = [r.json() for r in responses]
    assert len(group["faces"]) >= 4 and all(f["detected"] for f in group["faces"])
    check_answer(crop, FACES[0])
    assert corrupt["code"] == 400 and "corrupt" in corrupt["message"]
    assert no_face["faces"][0]["detected"] is False and no_face["detection"]["whole_image"]
    assert len(one["faces"]) == 1 and iou(one["faces"][0]["box"], SINGLE_BOX) >= 0.5
    check_detected(one["faces"][0])
    log = (server.workdir / "logs" / "model_log.log").read_text()
    batches = [tuple(map(int, m)) for m in re.findall(r"batch of (\d+) requests: (\d+) faces, (\d+) failed", log)]
    assert any(n > 2 and failed == 1 and faces > n for n, faces, failed in batches), batches


def test_server_logs_without_per_request_chatter(server):
    """config.properties' log4j2.xml is in force: start-up lines once each, no per-request
    frontend lines in ts_log.log, no per-batch worker line in model_log.log."""
    face = next((FIXTURES / "faces" / "happy").glob("*.jpg")).read_bytes()
    for _ in range(8):
        assert post(server, data=face).ok
    logs = server.workdir / "logs"
    ts_log = (logs / "ts_log.log").read_text()
    assert "Initialize Inference server with" in ts_log  # start-up lines are kept ...
    assert ts_log.count("Initialize Inference server with") == 1  # ... once, not twice
    for chatter in ("Backend response time", "Sending response for jobId", "Waiting time ns",
                    "result=[METRICS]"):
        assert chatter not in ts_log, chatter
    assert "Backend received inference at" not in (logs / "model_log.log").read_text()


def test_worker_serves_on_the_onednn_graph(server):
    """The archive's default CPU graph (handlers/cpu_graph.py) is the one the worker runs: its
    bucket graphs compiled and checked against the plain model at start-up, and answers right."""
    log = (server.workdir / "logs" / "model_log.log").read_text()
    graphs = re.findall(r"CPU graph (\w+), float16", log)
    assert graphs and set(graphs) == {"onednn"}, graphs
    assert "changed the output" not in log and "failed (" not in log
    for path in FACES[:3]:
        check_answer(post(server, data=path.read_bytes()).json(), path)
