"""Export: checkpoint → TorchScript (spec inside) → .mar with handler, labels and config."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from export.__main__ import main as export_main
from export.archive import TASKS, shared_handler_modules
from export.torchscript import compile_model, export_torchscript, verify_scripted
from handlers.common import load_scripted
from model_defs import LABELS, create_model, list_models, load_model, save_weights


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "random.pth"
    model = create_model("emo_resnet_s")
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    save_weights(model, path)
    return path


def test_torchscript_matches_eager_and_carries_spec(checkpoint, tmp_path):
    model = load_model(checkpoint)
    path = export_torchscript(model, model.spec.to_dict(), tmp_path / "model.pt")
    scripted, spec = load_scripted(path)
    assert spec == model.spec.to_dict()
    x = torch.randn(5, 1, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, got = model(x), scripted(x)
    assert got.shape == (5, len(LABELS))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert isinstance(scripted, torch.jit.ScriptModule)


class _Unscriptable(nn.Module):
    """A generator expression: TorchScript cannot compile it, tracing can."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(sum(t for t in (x, x)))


def test_trace_fallback_when_scripting_fails():
    model = _Unscriptable().eval()
    x = torch.randn(3, 4)
    compiled = compile_model(model, x)
    assert verify_scripted(model, compiled, torch.randn(3, 4)) < 1e-5


def test_verification_rejects_a_different_model():
    a, b = create_model("emo_resnet_s").eval(), create_model("emo_resnet_s").eval()
    with pytest.raises(RuntimeError, match="differs"):
        verify_scripted(a, compile_model(b, torch.zeros(1, 1, 48, 48)), torch.randn(2, 1, 48, 48))


def test_image_archive_contents(checkpoint, tmp_path):
    out = tmp_path / "store"
    assert export_main(["--task", "image", "--checkpoint", str(checkpoint), "--out", str(out),
                        "--batch-size", "4"]) == 0
    mar = out / "emotion_image.mar"
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        index = json.loads(z.read("index_to_name.json"))
        config = yaml.safe_load(z.read("model-config.yaml"))
        (tmp_path / "model.pt").write_bytes(z.read(manifest["model"]["serializedFile"]))
    shared = {p.name for p in shared_handler_modules()}
    assert {"image_handler.py", "common.py", "preprocess.py"} <= names
    assert shared <= names and "video_handler.py" not in names
    assert manifest["model"]["handler"] == "image_handler.py"
    assert manifest["model"]["modelName"] == "emotion_image"
    assert manifest["model"]["configFile"] == "model-config.yaml"
    assert [index[str(i)] for i in range(len(index))] == list(LABELS)
    assert config["batchSize"] == 4
    for key in ("maxBatchDelay", "minWorkers", "maxWorkers", "responseTimeout"):
        assert isinstance(config[key], int)
    assert config["handler"]["topk"] == 3
    # the TorchScript file in the archive carries the spec and gives the eager output
    scripted, spec = load_scripted(tmp_path / "model.pt")
    model = load_model(checkpoint)
    assert spec == model.spec.to_dict()
    x = torch.randn(3, 1, 48, 48)
    with torch.inference_mode():
        torch.testing.assert_close(scripted(x), model(x), atol=1e-5, rtol=1e-4)


def test_task_mismatch_is_refused(checkpoint, tmp_path):
    assert export_main(["--task", "video", "--checkpoint", str(checkpoint),
                        "--out", str(tmp_path)]) == 2
    assert not list(tmp_path.glob("*.mar"))


def test_every_task_names_its_handler_and_archive():
    for task, pkg in TASKS.items():
        assert pkg.handler == f"handlers/{task}_handler.py"
        assert pkg.archive_name(task) == f"emotion_{task}"
        assert {"batchSize", "maxBatchDelay", "minWorkers", "maxWorkers", "responseTimeout"} <= set(pkg.model_config)


@pytest.mark.parametrize("name", list_models())
def test_every_registered_network_exports_to_torchscript(name, tmp_path):
    """Every network in the registry scripts, carries its spec and matches its eager output."""

    torch.manual_seed(0)
    model = create_model(name).eval()
    path = export_torchscript(model, model.spec.to_dict(), tmp_path / f"{name}.pt", batch=2)
    _, spec = load_scripted(path)
    assert spec["arch"] == name and spec["labels"] == list(LABELS)
