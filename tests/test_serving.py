"""serving/: the TorchServe lifecycle module (the e2e tests exercise it against real servers)."""
from __future__ import annotations

import pytest

from serving import CONFIG, TorchServe, read_properties


def test_a_test_without_the_e2e_marker_cannot_start_torchserve(tmp_path):
    """tests/conftest.py refuses it before anything is started."""
    with pytest.raises(RuntimeError, match="mark it @pytest.mark.e2e"):
        TorchServe(tmp_path / "store", ["emotion_image.mar"], tmp_path / "work").start(timeout=1)


def test_the_resolved_config_is_a_copy_with_absolute_paths(tmp_path):
    """The server gets config.properties with metrics.yaml and log4j2.xml made absolute, written
    under ``workdir/build/`` (``make serve`` runs from the repository: never over the original)."""
    before = CONFIG.read_text()
    path = TorchServe(tmp_path / "store", [], tmp_path).resolved_config()
    assert path == tmp_path / "build" / "config.properties" and CONFIG.read_text() == before
    props = read_properties(path)
    assert props["metrics_config"] == str(CONFIG.parent / "metrics.yaml")
    assert f"-Dlog4j.configurationFile=file://{CONFIG.parent / 'log4j2.xml'}" in props["vmargs"]
    assert {k: v for k, v in props.items() if k not in ("metrics_config", "vmargs")} == \
        {k: v for k, v in read_properties().items() if k not in ("metrics_config", "vmargs")}
