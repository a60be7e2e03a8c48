"""End to end: the KServe store (``deploy.kserve_store``) served by a real TorchServe with
``service_envelope=kservev2`` and ``kserve``: Open Inference Protocol and KServe v1 requests
(images as base64 BYTES, several in one request, a video, bad input) answer what the plain
``/predictions`` route answers for the same bytes; and KServe's own model server (the
``kserve`` package, when ``make kserve-venv`` installed it) in front of TorchServe."""
from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Iterator

import pytest
import requests
import yaml

from deploy.kserve_store import StoreConfig, build_store, worker_threads, write_configs
from export.archive import TASKS
from handlers.contract import KSERVE_POD_CPUS
from model_defs.defaults import SHIPPED_WEIGHTS
from serving import TorchServe, running_server
from tests.nginx_proxy import NGINX, nginx_proxy, proxy_template
from tests.test_video_handler import _same, video_checkpoint
from tests.tsserver import free_port, image_weights, send_together, wait_for_http

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
FACES = sorted((FIXTURES / "faces").glob("*/*.jpg"))[:2]
GROUP = FIXTURES / "photos" / "group.jpg"
CLIP = FIXTURES / "video" / "mead_happy_1s_128.mp4"
NOT_MEDIA = b"this is not an image"
IMAGE, VIDEO = (TASKS[t].archive_name(t) for t in ("image", "video"))
INPUTS = {IMAGE: [*FACES, GROUP], VIDEO: [CLIP]}
KSERVE_PYTHON = Path(os.environ.get("KSERVE_PYTHON", REPO / "deploy" / ".kserve-venv" / "bin" / "python"))


def serve(store: Path, config: str, workdir: Path):
    """TorchServe on the store with one of its configurations (as KServe's runtime starts it)."""
    return running_server(store / "model-store", [IMAGE, VIDEO], workdir, config=store / "config" / config)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """The store, built as ``make kserve-store`` builds it, mounted where it lies."""
    tmp = tmp_path_factory.mktemp("kserve")
    video = SHIPPED_WEIGHTS["video"] if SHIPPED_WEIGHTS["video"].is_file() else video_checkpoint(tmp / "video.pth")
    store = tmp / "store"
    build_store(store, {"image": image_weights(tmp), "video": video}, root=str(store))
    write_configs(store, str(store), {"v1.properties": StoreConfig("v1", 0, tuple(TASKS))})
    return store


@pytest.fixture(scope="module")
def plain(store, tmp_path_factory) -> dict:
    """What ``POST /predictions/<model>`` answers for every input (the same archives, no
    envelope: ``rest.properties``), and, when nginx is installed, what deploy/k8s/'s
    authenticating proxy in front of that server answers (under the key ``PROXY``)."""
    answers: dict = {}
    tmp = tmp_path_factory.mktemp("plain")
    with serve(store, "rest.properties", tmp / "server") as ts:
        for model, paths in INPUTS.items():
            for path in paths:
                r = requests.post(ts.predictions_url(model), data=path.read_bytes(), headers=ts.auth(), timeout=120)
                assert r.status_code == 200, r.text
                answers[path] = r.json()
        r = requests.post(ts.predictions_url(IMAGE), data=NOT_MEDIA, headers=ts.auth(), timeout=60)
        assert 400 <= r.status_code < 500, r.text
        answers[NOT_MEDIA] = (r.status_code, r.json())
        if NGINX:
            answers["PROXY"] = through_the_proxy(tmp / "proxy")
    return answers


def through_the_proxy(tmp: Path) -> dict:
    """Requests through deploy/k8s/proxy-config.yaml's nginx configuration, rendered as the
    nginx image renders its templates (``${EMOTION_API_KEY}`` from the environment)."""
    key = "k8s-test-key"
    with nginx_proxy(proxy_template(), {"EMOTION_API_KEY": key}, tmp) as url:
        good = {"Authorization": f"Bearer {key}"}
        face = FACES[0].read_bytes()
        return {
            "with the key": requests.post(f"{url}/predictions/{IMAGE}", data=face, headers=good, timeout=60),
            "video": requests.post(f"{url}/predictions/{VIDEO}", data=CLIP.read_bytes(), headers=good, timeout=120),
            "bad input": requests.post(f"{url}/predictions/{IMAGE}", data=NOT_MEDIA, headers=good, timeout=60),
            "no key": requests.post(f"{url}/predictions/{IMAGE}", data=face, timeout=60),
            "wrong key": requests.post(f"{url}/predictions/{IMAGE}", data=face, timeout=60,
                                       headers={"Authorization": "Bearer nope"}),
            "management": requests.get(f"{url}/models/{IMAGE}", headers=good, timeout=60),
            "GET": requests.get(f"{url}/predictions/{IMAGE}", headers=good, timeout=60),
            "health": requests.get(f"{url}/healthz", timeout=60),
        }


@pytest.fixture(scope="module", params=["v2", "v1"])
def kserve(request, store, plain, tmp_path_factory) -> Iterator[tuple[str, TorchServe]]:
    """TorchServe with the store's KServe configuration: the shipped ``config.properties``
    (``service_envelope=kservev2``), or the same with ``kserve`` (v1)."""
    config = "config.properties" if request.param == "v2" else "v1.properties"
    with serve(store, config, tmp_path_factory.mktemp(f"kserve-{request.param}")) as ts:
        yield request.param, ts


def infer(base_url: str, protocol: str, model: str, bodies: list[bytes], headers: dict | None = None
          ) -> requests.Response:
    """One KServe request carrying every body as base64: v2 one BYTES input each, v1 one instance each."""
    b64 = [base64.b64encode(b).decode() for b in bodies]
    if protocol == "v2":
        payload = {"inputs": [{"name": f"input-{i}", "shape": [1], "datatype": "BYTES", "data": [x]}
                              for i, x in enumerate(b64)]}
        url = f"{base_url}/v2/models/{model}/infer"
    else:
        payload = {"instances": [{"data": x} for x in b64]}
        url = f"{base_url}/v1/models/{model}:predict"
    return requests.post(url, json=payload, headers=headers or {}, timeout=120)


def answers_of(protocol: str, model: str, r: requests.Response, n: int) -> list:
    """The per-input answers of a KServe response, after checking its protocol's shape."""
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    if protocol == "v1":
        assert list(body) == ["predictions"] and len(body["predictions"]) == n, body
        return body["predictions"]
    assert body["model_name"] == model and len(body["outputs"]) == n, body
    out = []
    for i, output in enumerate(body["outputs"]):
        assert output["name"] == f"input-{i}" and output["datatype"] == "BYTES"
        assert list(output["shape"]) == [1] and len(output["data"]) == 1
        out.append(json.loads(output["data"][0]))  # a BYTES element: the answer as JSON text
    return out


def same_as_plain(got: list, want: list) -> None:
    assert len(got) == len(want) and all(_same(g, w) for g, w in zip(got, want)), (got, want)


def test_the_store_holds_the_archives_with_threads_for_the_pod(store):
    for task in TASKS:
        with zipfile.ZipFile(store / "model-store" / f"{TASKS[task].archive_name(task)}.mar") as mar:
            cfg = yaml.safe_load(mar.read("model-config.yaml"))
        assert cfg["handler"]["threads"] == worker_threads(task) >= 1
        assert cfg["handler"]["threads"] * cfg["maxWorkers"] <= KSERVE_POD_CPUS


def test_one_image_as_base64_bytes(kserve, plain):
    protocol, ts = kserve
    r = infer(ts.inference_url, protocol, IMAGE, [FACES[0].read_bytes()], ts.auth())
    assert r.status_code == 200, r.text
    same_as_plain(answers_of(protocol, IMAGE, r, 1), [plain[FACES[0]]])


def test_several_images_in_one_request(kserve, plain):
    protocol, ts = kserve
    paths = INPUTS[IMAGE]
    r = infer(ts.inference_url, protocol, IMAGE, [p.read_bytes() for p in paths], ts.auth())
    assert r.status_code == 200, r.text
    got = answers_of(protocol, IMAGE, r, len(paths))
    same_as_plain(got, [plain[p] for p in paths])
    assert len(got[-1]["faces"]) == plain[GROUP]["detection"]["faces_detected"] > 1  # the group photo


def test_a_video(kserve, plain):
    protocol, ts = kserve
    r = infer(ts.inference_url, protocol, VIDEO, [CLIP.read_bytes()], ts.auth())
    assert r.status_code == 200, r.text
    same_as_plain(answers_of(protocol, VIDEO, r, 1), [plain[CLIP]])


def test_bad_input_in_a_request_gets_its_4xx_and_the_others_are_answered(kserve, plain):
    """One request, one status: the bad input's 4xx; every input's answer or error in the body."""
    protocol, ts = kserve
    status, error = plain[NOT_MEDIA]
    r = infer(ts.inference_url, protocol, IMAGE, [FACES[0].read_bytes(), NOT_MEDIA, GROUP.read_bytes()], ts.auth())
    assert r.status_code == status, r.text
    got = answers_of(protocol, IMAGE, r, 3)
    assert got[1] == error and set(error) == {"code", "type", "message"} and "cannot decode image" in error["message"]
    same_as_plain([got[0], got[2]], [plain[FACES[0]], plain[GROUP]])


def test_concurrent_requests_each_get_their_own_status(kserve, plain):
    """Good and bad requests at once (the envelope serves them one by one: batch size 1)."""
    protocol, ts = kserve
    status, error = plain[NOT_MEDIA]
    bodies = [FACES[0].read_bytes(), NOT_MEDIA, FACES[1].read_bytes(), NOT_MEDIA]
    results = send_together(lambda b: infer(ts.inference_url, protocol, IMAGE, [b], ts.auth()), bodies)
    assert [r.status_code for r in results] == [200, status, 200, status]
    same_as_plain([answers_of(protocol, IMAGE, results[i], 1)[0] for i in (0, 2)], [plain[FACES[0]], plain[FACES[1]]])
    assert all(answers_of(protocol, IMAGE, results[i], 1) == [error] for i in (1, 3))


def test_the_plain_route_is_not_served_behind_an_envelope(kserve):
    """The envelope parses every request as KServe JSON: the store's REST config is for /predictions."""
    _, ts = kserve
    r = requests.post(ts.predictions_url(IMAGE), data=FACES[0].read_bytes(), headers=ts.auth(), timeout=60)
    assert r.status_code >= 500, r.text


def test_malformed_kserve_json_fails_in_torchserves_envelope(kserve):
    """A body without ``inputs``/``instances`` never reaches the handler: TorchServe's envelope
    raises and TorchServe answers 503 (KServe's model server checks a v2 body first: 4xx)."""
    protocol, ts = kserve
    route = f"/v2/models/{IMAGE}/infer" if protocol == "v2" else f"/v1/models/{IMAGE}:predict"
    r = requests.post(f"{ts.inference_url}{route}", json={"data": "nothing"}, headers=ts.auth(), timeout=60)
    assert r.status_code == 503, r.text


def test_the_probe_passes_on_the_store_configuration(kserve):
    """deploy/probe.py as the manifests run it, token authorization off (no key file)."""
    _, ts = kserve
    cmd = [sys.executable, str(REPO / "deploy" / "probe.py"), "--management", ts.management_url, IMAGE, VIDEO]
    r = subprocess.run(cmd, cwd=ts.workdir, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and not (ts.workdir / "key_file.json").exists(), r.stderr


@pytest.mark.skipif(not NGINX, reason="nginx is not installed (apt-get install nginx-light)")
def test_the_k8s_proxy_checks_the_key_and_publishes_only_predictions(plain):
    got = plain["PROXY"]
    assert got["with the key"].status_code == 200 and _same(got["with the key"].json(), plain[FACES[0]])
    assert got["video"].status_code == 200 and _same(got["video"].json(), plain[CLIP])
    status, error = plain[NOT_MEDIA]
    assert (got["bad input"].status_code, got["bad input"].json()) == (status, error)
    for name in ("no key", "wrong key"):
        assert got[name].status_code == 401 and got[name].json()["type"] == "Unauthorized"
    assert got["management"].status_code == 404 and got["GET"].status_code == 403
    assert got["health"].status_code == 200


@contextlib.contextmanager
def kserve_model_server(config: Path, log: Path) -> Iterator[str]:
    """``python -m deploy.kserve_frontend`` (the ``kserve`` package's model server) on a free port."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(KSERVE_PYTHON), "-m", "deploy.kserve_frontend", "--ts-config", str(config),
                                 "--http-port", str(port)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/v2/health/ready", proc, log)
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.mark.skipif(not KSERVE_PYTHON.is_file(), reason=f"no kserve venv at {KSERVE_PYTHON} (make kserve-venv)")
def test_through_kserves_model_server(kserve, plain, store, tmp_path):
    """KServe's model server in front, as in KServe's TorchServe runtime: same answers; its
    health and metadata routes answer; a bad input comes back 500, TorchServe's message inside."""
    protocol, ts = kserve
    config = store / "config" / ("config.properties" if protocol == "v2" else "v1.properties")
    with kserve_model_server(config, tmp_path / "kserve.log") as url:
        assert requests.get(f"{url}/v2/models/{IMAGE}/ready", timeout=10).json() == {"name": IMAGE, "ready": True}
        paths = INPUTS[IMAGE]
        r = infer(url, protocol, IMAGE, [p.read_bytes() for p in paths])
        assert r.status_code == 200, r.text
        same_as_plain(answers_of(protocol, IMAGE, r, len(paths)), [plain[p] for p in paths])
        r = infer(url, protocol, VIDEO, [CLIP.read_bytes()])
        same_as_plain(answers_of(protocol, VIDEO, r, 1), [plain[CLIP]])
        status, error = plain[NOT_MEDIA]
        r = infer(url, protocol, IMAGE, [NOT_MEDIA])
        assert r.status_code == 500 and f"'{status} " in r.json()["error"] and error["message"] in r.json()["error"]
        if protocol == "v2":  # KServe checks a v2 body before passing it on (a v1 body it does not)
            r = requests.post(f"{url}/v2/models/{IMAGE}/infer", json={"data": "nothing"}, timeout=60)
            assert 400 <= r.status_code < 500, r.text
