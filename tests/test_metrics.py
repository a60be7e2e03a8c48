"""handlers/metrics.py against TorchServe's own metrics cache loaded from the repo's metrics.yaml."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handlers import metrics as hm
from tests.tsserver import REPO, read_properties


@pytest.fixture
def context():
    cache = MetricsCacheYamlImpl(config_file_path=str(REPO / read_properties()["metrics_config"]))
    cache.initialize_cache()
    cache.model_name = "emotion_image"
    return SimpleNamespace(metrics=cache, model_name="emotion_image")


def metric_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]")]


def test_batch_emits_declared_counters_and_batch_size(context, caplog):
    m = hm.BatchMetrics(context)
    m.batch_size = 3
    with m.timed("decode"):
        sum(range(10000))
    m.count(requests=2, failed=1, faces=4)
    with caplog.at_level(logging.INFO):
        m.emit()
    lines = metric_lines(caplog)
    by_name = {line.split("]", 1)[1].split(".", 1)[0]: line for line in lines}
    assert "emotion_requests_total.count:2.0|#ModelName:emotion_image,Level:Model|#type:COUNTER" in by_name["emotion_requests_total"]
    assert "emotion_failed_requests_total.count:1.0|" in by_name["emotion_failed_requests_total"]
    assert "emotion_faces_total.count:4.0|" in by_name["emotion_faces_total"]
    assert float(by_name["emotion_decode_ms_total"].split(":", 1)[1].split("|")[0]) > 0
    assert "emotion_batch_size.count:3|#ModelName:emotion_image,Level:Model|#type:HISTOGRAM" in by_name["emotion_batch_size"]
    # nothing timed, nothing sent: zero counters are not emitted
    assert "emotion_detect_ms_total" not in by_name and "emotion_inference_ms_total" not in by_name
    assert not any("Failed to update" in r.getMessage() or "not declared" in r.getMessage()
                   for r in caplog.records)


def test_without_metrics_cache_nothing_happens(caplog):
    m = hm.BatchMetrics(SimpleNamespace(metrics=None, model_name="x"))
    m.count(requests=1)
    with caplog.at_level(logging.INFO):
        m.emit()
    assert metric_lines(caplog) == []


def test_broken_cache_never_raises(caplog):
    class Broken:
        def get_metric(self, *a, **k):
            raise RuntimeError("boom")

        def add_metric_to_cache(self, *a, **k):
            raise RuntimeError("boom")

    m = hm.BatchMetrics(SimpleNamespace(metrics=Broken(), model_name="x"))
    m.count(requests=1)
    m.emit()  # must not raise
