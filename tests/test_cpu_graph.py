"""The CPU graph a handler serves on (handlers/cpu_graph.py): oneDNN Graph fusion with padded
batch buckets, the MKLDNN graph, the exported one; each checked against the plain model."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from bench.bench_model import export_weights
from export.archive import SERIALIZED_NAME
from export.torchscript import example_input
from handlers import cpu_graph
from handlers.common import load_scripted
from handlers.contract import BATCH_BUCKETS, CPU_GRAPHS, IMAGE_DEFAULTS
from handlers.image_handler import EmotionImageHandler
from model_defs import create_model, save_weights
from tests.handler_context import extracted_archive, make_context

SHIPPED = Path(__file__).resolve().parents[1] / "pretrain" / "emotion_image.pth"


@pytest.fixture(scope="module")
def exported() -> tuple[dict, Path]:
    """The shipped image network exported as ``make serve`` does (frozen TorchScript)."""
    folder = tempfile.mkdtemp()
    return export_weights(SHIPPED, folder)


@pytest.fixture(autouse=True)
def _fusion_off_after():
    """The fusion switch is process-wide: leave it as the test found it."""
    before = torch._C._jit_llga_enabled()
    yield
    torch.jit.enable_onednn_fusion(before)


def test_mode_names_and_old_booleans():
    assert IMAGE_DEFAULTS["optimize"] == "onednn" == CPU_GRAPHS[0]
    assert cpu_graph.cpu_graph_mode(True) == "onednn"
    assert cpu_graph.cpu_graph_mode(False) == "off"
    assert cpu_graph.cpu_graph_mode(" MKLDNN ") == "mkldnn"
    with pytest.raises(ValueError, match="onednn, mkldnn, off"):
        cpu_graph.cpu_graph_mode("fast")


def test_padded_batches_call_only_bucket_sizes_and_keep_each_row():
    seen: list[int] = []

    def rows(x: torch.Tensor) -> torch.Tensor:  # (N, 3), each row from its own input alone
        return x.flatten(1).sum(1, keepdim=True) * torch.arange(1, 4)

    def model(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return rows(x)

    padded = cpu_graph.PaddedBatches(model)
    for n in (0, 1, 3, 5, 17, 64, 65, 130):
        x = torch.randn(n, 1, 4, 4)
        assert torch.equal(padded(x), rows(x)), n
    assert set(seen) <= set(BATCH_BUCKETS)
    assert seen[:4] == [1, 1, 4, 8]  # 0 rows: one padded call; 1 as it is; 3 -> 4; 5 -> 8
    assert cpu_graph.bucket_size(33) == 64 and cpu_graph.bucket_size(2) == 2


@pytest.mark.parametrize("mode", ["onednn", "mkldnn"])
def test_faster_graph_gives_the_plain_answer(exported, mode):
    spec, path = exported
    reload = lambda: load_scripted(path)[0]  # noqa: E731
    plain = reload()
    fast, used = cpu_graph.optimize_for_cpu(reload(), example_input(spec, 2), reload, mode)
    assert used == mode
    with torch.inference_mode():
        for n in (1, 3, 33, 70):
            x = torch.randn(n, 1, spec["input_size"], spec["input_size"], generator=torch.Generator().manual_seed(n))
            assert torch.allclose(fast(x), plain(x), atol=1e-4, rtol=1e-3), (mode, n)
    if mode == "onednn":  # the bucket graphs really run as fused oneDNN partitions
        assert isinstance(fast, cpu_graph.PaddedBatches) and torch._C._jit_llga_enabled()
        kinds = {n.kind() for n in torch.jit.last_executed_optimized_graph().nodes()}
        assert any("onednn" in k.lower() or "llga" in k.lower() for k in kinds), kinds
    else:
        assert "mkldnn" in str(fast.graph).lower()


def test_off_is_the_exported_graph(exported):
    spec, path = exported
    model = load_scripted(path)[0]
    got, used = cpu_graph.optimize_for_cpu(model, example_input(spec, 2), lambda: load_scripted(path)[0], "off")
    assert got is model and used == "off"


@pytest.mark.parametrize("failure", ["wrong answer", "exception"])
def test_a_faster_graph_that_fails_falls_back_to_a_fresh_plain_one(exported, monkeypatch, failure):
    spec, path = exported

    def broken(model, mode, example):
        if failure == "exception":
            raise RuntimeError("no oneDNN here")
        torch.jit.enable_onednn_fusion(True)
        return lambda x: model(x) + 1.0

    monkeypatch.setattr(cpu_graph, "_faster_graph", broken)
    reloaded: list = []

    def reload():
        reloaded.append(load_scripted(path)[0])
        return reloaded[-1]

    got, used = cpu_graph.optimize_for_cpu(load_scripted(path)[0], example_input(spec, 2), reload, "onednn")
    assert used == "off" and got is reloaded[-1] and len(reloaded) == 2  # the reference, then the fallback
    assert not torch._C._jit_llga_enabled()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An extracted emotion_image.mar of a random emo_mobilenet_v2."""
    tmp = tmp_path_factory.mktemp("mar")
    torch.manual_seed(0)
    save_weights(create_model("emo_mobilenet_v2"), tmp / "random.pth")
    return extracted_archive("image", tmp / "random.pth", tmp)


@pytest.mark.parametrize("option,want", [(None, "onednn"), ("mkldnn", "mkldnn"), (False, "off")])
def test_handler_serves_on_the_configured_graph(model_dir, option, want):
    h = EmotionImageHandler()
    h.initialize(make_context(model_dir, 1, None if option is None else {"optimize": option}))
    assert h.cpu_graph == want and h.optimized == (want != "off")
    x = torch.randn(5, 1, h.input_size, h.input_size)
    plain = load_scripted(model_dir / SERIALIZED_NAME)[0]
    with torch.inference_mode():
        assert torch.allclose(h.model(x), plain(x), atol=1e-4, rtol=1e-3)


def test_handler_rejects_an_unknown_graph(model_dir):
    with pytest.raises(ValueError, match="optimize"):
        EmotionImageHandler().initialize(make_context(model_dir, 1, {"optimize": "turbo"}))
