"""End to end: the handlers' custom metrics reach TorchServe's Prometheus endpoint.

Builds emotion_image.mar, serves it with the repository's config.properties (metrics_mode
prometheus, metrics_config metrics.yaml), sends face crops and a photo, and scrapes
``/metrics`` for the ``emotion_*`` metrics declared in metrics.yaml and emitted by
handlers/metrics.py.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import requests
import torch
import yaml

from export.__main__ import main as export_main
from handlers import metrics as handler_metrics
from model_defs import create_model, save_weights
from serving import read_properties, running_server

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
FACES = sorted((FIXTURES / "faces").glob("*/*.jpg"))[:6]
PHOTO = FIXTURES / "photos" / "single_face.jpg"


def declared_model_metrics(path: Path) -> dict[str, str]:
    """``{name: type}`` of the model metrics in a TorchServe metrics yaml."""
    data = yaml.safe_load(path.read_text())
    return {m["name"]: kind for kind, items in data["model_metrics"].items() for m in items}


def test_config_declares_every_handler_metric():
    props = read_properties()
    assert props.get("metrics_mode") == "prometheus"
    declared = declared_model_metrics(REPO / props["metrics_config"])
    for name, _ in handler_metrics.COUNTERS.values():
        assert declared.get(name) == "counter", name
    for name, _ in handler_metrics.HISTOGRAMS.values():
        assert declared.get(name) == "histogram", name


def sample(text: str, name: str, model: str) -> float | None:
    """The value of ``name{...ModelName="model"...}`` in Prometheus text, or None."""
    for line in text.splitlines():
        if line.startswith(name) and f'ModelName="{model}"' in line:
            head, value = line.rsplit(" ", 1)
            if re.fullmatch(rf"{re.escape(name)}\{{.*\}}", head):
                return float(value)
    return None


@pytest.mark.e2e
@pytest.mark.slow
def test_custom_metrics_on_prometheus_endpoint(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "random.pth"
    save_weights(create_model("emo_resnet_s"), ckpt)
    store = tmp_path / "model_store"
    assert export_main(["--task", "image", "--checkpoint", str(ckpt), "--out", str(store)]) == 0
    with running_server(store, ["emotion_image=emotion_image.mar"], tmp_path / "server") as ts:
        url = ts.predictions_url("emotion_image")
        for path in [*FACES, PHOTO]:
            r = requests.post(url, data=path.read_bytes(), headers=ts.auth(), timeout=120)
            assert r.status_code == 200, r.text
        bad = requests.post(url, data=b"not an image", headers=ts.auth(), timeout=120)
        assert bad.status_code in (400, 415), bad.text
        want = {"emotion_requests_total": len(FACES) + 1, "emotion_faces_total": len(FACES) + 1,
                "emotion_failed_requests_total": 1}
        timed = ["emotion_decode_ms_total", "emotion_detect_ms_total", "emotion_inference_ms_total"]
        deadline = time.monotonic() + 30  # the frontend parses the workers' metric log lines
        while True:
            text = requests.get(f"{ts.metrics_url}/metrics", timeout=10).text
            values = {n: sample(text, n, "emotion_image") for n in [*want, *timed]}
            batches = sample(text, "emotion_batch_size_count", "emotion_image")
            done = all(values[n] is not None and values[n] >= v for n, v in want.items())
            if done and all((values[n] or 0) > 0 for n in timed) and (batches or 0) > 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"custom metrics missing on {ts.metrics_url}/metrics: {values}, "
                            f"batches {batches}\n"
                            + "\n".join(l for l in text.splitlines() if "emotion" in l))
            time.sleep(1)
        assert values["emotion_requests_total"] == len(FACES) + 1
        assert values["emotion_failed_requests_total"] == 1
        # one face per crop, the photo's face (whole image or detected): at least one each
        assert values["emotion_faces_total"] >= len(FACES) + 1
