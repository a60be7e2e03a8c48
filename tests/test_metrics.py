"""handlers/metrics.py against TorchServe's own metrics cache loaded from the repo's metrics.yaml."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handlers import metrics as hm
from serving import read_properties
from tests.tsserver import REPO


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
    # "[METRICS]<name>.<unit>:<value>|#<dims>|#type:<TYPE>|#hostname:..."
    parsed = {}
    for line in metric_lines(caplog):
        head, dims, kind = line[len("[METRICS]"):].split("|")[:3]
        name_unit, value = head.rsplit(":", 1)
        parsed[name_unit.split(".", 1)[0]] = (float(value), dims, kind)
    dims = "#ModelName:emotion_image,Level:Model"
    assert parsed["emotion_requests_total"] == (2.0, dims, "#type:COUNTER")
    assert parsed["emotion_failed_requests_total"] == (1.0, dims, "#type:COUNTER")
    assert parsed["emotion_faces_total"] == (4.0, dims, "#type:COUNTER")
    assert parsed["emotion_decode_ms_total"][0] > 0
    assert parsed["emotion_batch_size"] == (3.0, dims, "#type:HISTOGRAM")
    by_name = parsed
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
