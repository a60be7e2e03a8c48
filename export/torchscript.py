"""Compile a network to TorchScript with its spec stored inside the file, and check it."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from handlers.common import load_scripted
from handlers.contract import SPEC_FILE
from model_defs import inference_model

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """TorchScript is deprecated upstream but is TorchServe's portable format: hide the notice."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is deprecated", category=FutureWarning)
        yield


def example_input(spec: Mapping[str, Any], batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A random input batch shaped for ``spec``.

    Image models take ``(N, C, S, S)``; video models (``clip_len > 0``) take
    ``(N, C, T, S, S)`` unless the spec's ``extra["input_shape"]`` (without N) says otherwise.
    """
    g = torch.Generator().manual_seed(seed)
    shape = spec.get("extra", {}).get("input_shape")
    if shape is None:
        c, s = int(spec["channels"]), int(spec["input_size"])
        shape = (c, s, s) if int(spec.get("clip_len", 0)) <= 0 else (c, int(spec["clip_len"]), s, s)
    return torch.randn((batch, *map(int, shape)), generator=g)


def compile_model(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """``torch.jit.script`` the model; fall back to tracing on ``example`` if scripting fails."""
    model = model.eval()
    with _quiet():
        try:
            return torch.jit.script(model)
        except Exception as e:  # scripting rejects some Python constructs; tracing covers them
            logger.warning("torch.jit.script failed (%s); falling back to torch.jit.trace", e)
            with torch.no_grad():
                return torch.jit.trace(model, example)


def verify_scripted(model: nn.Module, scripted: torch.jit.ScriptModule, example: torch.Tensor,
                    atol: float = 1e-5, rtol: float = 1e-4) -> float:
    """Check the compiled module gives the eager model's output; returns the max abs difference."""
    model.eval()
    scripted.eval()
    with torch.inference_mode():
        want = model(example)
        got = scripted(example)
    if got.shape != want.shape:
        raise RuntimeError(f"TorchScript output shape {tuple(got.shape)} != eager {tuple(want.shape)}")
    diff = (got - want).abs().max().item()
    if not torch.allclose(got, want, atol=atol, rtol=rtol):
        raise RuntimeError(f"TorchScript output differs from eager output (max abs diff {diff:.3g})")
    return diff


def export_torchscript(model: nn.Module, spec: Mapping[str, Any], path: str | os.PathLike,
                       batch: int = 4, freeze: bool = True) -> Path:
    """Compile ``model``, save it to ``path`` with the spec inside (``contract.SPEC_FILE``), read it
    back with the handlers' loader (``handlers.common.load_scripted``) and verify it.

    ``freeze``: inline the weights as constants and fold BatchNorm into the convolutions
    (``torch.jit.freeze``; device-neutral, unlike ``optimize_for_inference``, whose CPU graph
    uses MKLDNN ops: the handlers choose their CPU graph at load time, ``handlers/cpu_graph.py``). The saved file is
    loaded back and compared with the eager model on a random batch, so what is written is
    exactly what was checked. The spec's ``extra["tta_flip"]`` (mirror averaging) and
    ``extra["temperature"]`` (calibration) are compiled in (``model_defs.inference_model``), so
    the server scores inputs exactly as evaluation and the SDK do.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = inference_model(model, extra=spec.get("extra") or {})  # as evaluation scores it
    example = example_input(spec, batch)
    scripted = compile_model(model, example)
    if freeze:
        with _quiet():
            scripted = torch.jit.freeze(scripted.eval())
    with _quiet():
        torch.jit.save(scripted, str(path), _extra_files={SPEC_FILE: json.dumps(dict(spec), sort_keys=True)})
    loaded, loaded_spec = load_scripted(path)
    if loaded_spec != json.loads(json.dumps(dict(spec))):
        raise RuntimeError(f"{path}: spec read back differs from the spec written")
    diff = verify_scripted(model, loaded, example)
    logger.info("TorchScript %s verified against eager model (max abs diff %.2g)", path, diff)
    return path
