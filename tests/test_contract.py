"""One home per serving contract: the archive's YAML, the handlers and the limits agree."""
from __future__ import annotations

import ast
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from export.archive import TASKS, build_archive, model_config_for
from handlers import common, contract
from handlers.video_decode import VideoLimits
from model_defs import LABELS
from serving import read_properties


@pytest.mark.parametrize("task", sorted(TASKS))
def test_archive_yaml_is_the_handlers_defaults(task, tmp_path):
    """The model-config.yaml inside a built .mar: the task's TorchServe settings and, as its
    ``handler:`` section, exactly the handler's defaults."""
    dummy = tmp_path / "model.pt"
    dummy.write_bytes(b"not read by the archiver")
    mar = build_archive(task, dummy, {"labels": list(LABELS)}, tmp_path / "store")
    with zipfile.ZipFile(mar) as z:
        cfg = yaml.safe_load(z.read("model-config.yaml"))
    assert cfg.pop("handler") == dict(contract.HANDLER_DEFAULTS[task])
    assert cfg == dict(TASKS[task].model_config)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_handler_without_the_yaml_gets_the_served_options(task):
    """A handler started without model-config.yaml (a test, a benchmark) runs with the
    archive's options; the YAML's values win over the defaults."""
    bare = SimpleNamespace(model_yaml_config=None)
    assert common.handler_options(bare, task) == model_config_for(task)["handler"]
    tuned = SimpleNamespace(model_yaml_config={"handler": {"topk": 5}})
    assert common.handler_options(tuned, task) == {**contract.HANDLER_DEFAULTS[task], "topk": 5}


def test_video_limits_default_to_the_served_ones():
    assert VideoLimits() == VideoLimits.from_mapping(model_config_for("video")["handler"])
    assert VideoLimits().max_duration_s == 60.0


def test_detection_sides_and_modes():
    """Photos keep detail for small faces; video frames are detected smaller, for speed."""
    assert contract.IMAGE_DEFAULTS["detect_max_side"] == contract.MAX_DETECT_SIDE == 1920
    assert contract.VIDEO_DEFAULTS["detect_max_side"] == contract.VIDEO_DETECT_MAX_SIDE == 640
    assert contract.DETECTION_MODES == ("auto", "always", "never")
    for defaults in contract.HANDLER_DEFAULTS.values():
        assert defaults["detection"] in contract.DETECTION_MODES


def test_request_size_limit_is_config_properties():
    assert int(read_properties()["max_request_size"]) == contract.MAX_REQUEST_BYTES


def test_contract_imports_only_the_standard_library():
    """export, model_defs and training import it, and it packs flat into every archive."""
    tree = ast.parse(Path(contract.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= {"__future__", "types", "typing"}, names
