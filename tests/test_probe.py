"""The Kubernetes probe (deploy/probe.py) against a real TorchServe with token authorization on,
run as the kubelet runs an exec probe: ``python3 probe.py ...`` in TorchServe's working folder."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from export.__main__ import main as export_main
from serving import running_server
from tests.tsserver import free_port, image_weights

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "deploy" / "probe.py"
MODEL = "emotion_image"

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def probe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROBE), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """TorchServe as ``make serve`` starts it (the repository's config.properties: token
    authorization on), with the image model only."""
    tmp = tmp_path_factory.mktemp("probe")
    store = tmp / "model_store"
    assert export_main(["--task", "image", "--checkpoint", str(image_weights(tmp)), "--out", str(store),
                        "--workers", "1"]) == 0
    with running_server(store, [f"{MODEL}={MODEL}.mar"], tmp / "server") as ts:
        yield ts


def ready(ts, *models: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return probe("--management", ts.management_url, *models, cwd=cwd or ts.workdir)


def test_ready_with_the_key_file_torchserve_wrote(server):
    assert (server.workdir / "key_file.json").is_file()
    r = ready(server, MODEL)
    assert r.returncode == 0, r.stderr


def test_without_the_key_torchserve_answers_400_and_the_probe_fails(server, tmp_path):
    assert requests.get(f"{server.inference_url}/ping", timeout=10).status_code == 400  # what a kubelet httpGet gets
    r = ready(server, MODEL, cwd=tmp_path)  # no key_file.json here
    assert r.returncode == 1 and "answered 400" in r.stderr, r.stderr
    r = probe("--live", "--management", server.management_url, "--inference", server.inference_url, cwd=tmp_path)
    assert r.returncode == 1 and "ping answered 400" in r.stderr, r.stderr


def test_fails_for_a_model_that_is_not_loaded(server):
    r = ready(server, MODEL, "emotion_video")
    assert r.returncode == 1 and "emotion_video: management API answered 404" in r.stderr, r.stderr


def test_fails_while_the_model_has_no_worker_and_passes_once_it_has_one(server):
    """A model scaled to zero workers: the probe fails while /ping (which a probe could use)
    still says Healthy and the metrics port (no key needed) answers 200; back to one worker,
    the probe passes again."""
    scale = f"{server.management_url}/models/{MODEL}?synchronous=true"
    try:
        r = requests.put(f"{scale}&min_worker=0&max_worker=0", headers=server.auth("management"), timeout=120)
        assert r.status_code == 200, r.text
        r = ready(server, MODEL)
        assert r.returncode == 1 and f"{MODEL}: no READY worker" in r.stderr, r.stderr
        ping = requests.get(f"{server.inference_url}/ping", headers=server.auth(), timeout=10)
        assert ping.status_code == 200 and ping.json()["status"] == "Healthy"
        assert requests.get(f"{server.metrics_url}/metrics", timeout=10).status_code == 200
        assert probe("--live", "--management", server.management_url, "--inference", server.inference_url,
                     cwd=server.workdir).returncode == 0  # alive, not ready: no restart
    finally:
        r = requests.put(f"{scale}&min_worker=1&max_worker=1", headers=server.auth("management"), timeout=180)
        assert r.status_code == 200, r.text
    deadline = time.monotonic() + 120
    while (r := ready(server, MODEL)).returncode != 0:
        assert time.monotonic() < deadline, r.stderr
        time.sleep(1)


def test_fails_when_nothing_listens(tmp_path):
    r = probe("--management", f"http://127.0.0.1:{free_port()}", MODEL, cwd=tmp_path)
    assert r.returncode == 1 and "Connection refused" in r.stderr, r.stderr
