"""End to end: build emotion_video.mar, serve it with a real TorchServe, send real clips over REST and gRPC."""
from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
import requests
from PIL import Image

from export.__main__ import main as export_main
from model_defs import LABELS
from tests import videoutil
from serving.grpc_client import predict as grpc_predict
from tests.test_video_frames import group_pan
from tests.test_video_handler import _same, video_checkpoint
from serving import running_server
from tests.tsserver import send_together

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "pretrain" / "emotion_video.pth"
FIXTURES = Path(__file__).parent / "fixtures" / "video"
MP4 = FIXTURES / "mead_happy_1s_128.mp4"
MOV = FIXTURES / "face_leaves_hevc_256x144.mov"
BATCH_DELAY_MS = 300  # long enough that concurrent test requests share a batch
MODEL = "emotion_video"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """TorchServe with emotion_video.mar from the shipped weights (random ones if absent)."""
    tmp = tmp_path_factory.mktemp("video-e2e")
    ckpt = SHIPPED if SHIPPED.is_file() else video_checkpoint(tmp / "random.pth")
    store = tmp / "model_store"
    assert export_main(["--task", "video", "--checkpoint", str(ckpt), "--out", str(store),
                        "--max-batch-delay", str(BATCH_DELAY_MS), "--batch-size", "4"]) == 0
    with running_server(store, [f"{MODEL}=emotion_video.mar"], tmp / "server") as ts:
        yield ts


def post(ts, **kwargs) -> requests.Response:
    return requests.post(ts.predictions_url(MODEL), headers=ts.auth(), timeout=120, **kwargs)


def check_answer(answer: dict, frames: int, timeline: bool) -> None:
    assert {"top3", "duration", "frames", "fps", "faces"} <= set(answer), answer
    assert ("timeline" in answer) == timeline
    assert answer["frames"] == frames
    for top in [answer["top3"]] + [w["top3"] for w in answer.get("timeline", [])]:
        labels = [t["label"] for t in top]
        probs = [t["probability"] for t in top]
        assert len(set(labels)) == 3 and set(labels) <= set(LABELS)
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5


def encoded(kind: str) -> bytes:
    face = Image.open(FIXTURES / "face_happy.jpg")
    return videoutil.encode(videoutil.moving_face(face, n=30, size=96), kind, fps=10)


def test_rest_h264_mp4(server):
    r = post(server, data=MP4.read_bytes())
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    answer = r.json()
    check_answer(answer, 25, timeline=False)
    assert answer["faces"]["found_frames"] == 16 and answer["faces"]["whole_frame"] is False


def test_rest_hevc_mov_timeline_while_the_face_leaves(server):
    r = post(server, data=MOV.read_bytes())
    assert r.status_code == 200, r.text
    answer = r.json()
    check_answer(answer, 85, timeline=True)
    starts = [w["start"] for w in answer["timeline"]]
    assert starts[0] == 0.0 and starts == sorted(starts) and answer["timeline"][-1]["end"] == pytest.approx(
        answer["duration"], abs=1e-3)
    assert 0 < answer["faces"]["found_frames"] < answer["faces"]["sampled_frames"]


@pytest.mark.parametrize("kind", ["gif", "webm"])
def test_rest_clips_encoded_here(server, kind):
    r = post(server, data=encoded(kind))
    assert r.status_code == 200, r.text
    check_answer(r.json(), 30, timeline=True)  # 3 s > one 2 s window


def test_multipart_json_and_grpc_agree_with_raw_body(server):
    data = MP4.read_bytes()
    raw = post(server, data=data).json()
    multipart = post(server, files={"video": (MP4.name, data, "video/mp4")})
    as_json = post(server, json={"video": base64.b64encode(data).decode()})
    assert multipart.status_code == 200 and as_json.status_code == 200
    assert multipart.json() == raw and as_json.json() == raw
    assert grpc_predict(server.grpc_inference, MODEL, data, server.keys["inference"]) == raw


def test_grpc_reports_a_bad_video_in_the_body(server):
    answer = grpc_predict(server.grpc_inference, MODEL, videoutil.encode_audio(), server.keys["inference"])
    assert answer["code"] == 422 and "no video stream" in answer["message"]


def test_corrupt_clip_in_a_batch_fails_alone(server):
    good = MP4.read_bytes()
    bodies = [good, encoded("webm"), good[: len(good) // 3], good]
    responses = send_together(lambda body: post(server, data=body), bodies)
    assert [r.status_code for r in responses] == [200, 200, 400, 200], [r.text for r in responses]
    err = responses[2].json()
    assert err["code"] == 400 and err["type"] == "BadRequest" and "corrupt" in err["message"]
    check_answer(responses[0].json(), 25, timeline=False)
    check_answer(responses[1].json(), 30, timeline=True)
    assert _same(responses[3].json(), responses[0].json())
    # the corrupt request really shared a batch with good ones
    log = (server.workdir / "logs" / "model_log.log").read_text()
    batches = [tuple(map(int, m)) for m in re.findall(r"video batch of (\d+) requests: (\d+) clips, (\d+) failed", log)]
    assert any(n > 1 and failed == 1 for n, _, failed in batches), batches


def test_rest_several_people_get_their_own_answers(server):
    """A camera pan over a four-face photo: four tracked people (a fifth, in profile, may be
    found on some frames), each with a top-3 and a timeline."""
    r = post(server, data=group_pan()[0])
    assert r.status_code == 200, r.text
    answer = r.json()
    check_answer(answer, 40, timeline=True)
    assert len(answer["people"]) in (4, 5) and answer["people"][0]["top3"] == answer["top3"]
    assert answer["faces"]["detected_frames"] < answer["faces"]["sampled_frames"]
    for p in answer["people"][:4]:
        assert len(p["top3"]) == 3 and len(p["timeline"]) == len(answer["timeline"])


def test_worker_serves_on_the_onednn_graph(server):
    """The video archive's default CPU graph (handlers/cpu_graph.py) is the one its worker runs."""
    log = (server.workdir / "logs" / "model_log.log").read_text()
    graphs = re.findall(r"CPU graph (\w+); faces", log)
    assert graphs and set(graphs) == {"onednn"}, graphs
    assert "changed the output" not in log and "failed (" not in log
