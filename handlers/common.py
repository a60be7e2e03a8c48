"""Plumbing shared by the TorchServe handlers: request bodies, per-request errors, top-k, the
handler options and loading the TorchScript file with its spec (which export also uses).

TorchServe hands a handler one dict per request. A raw body arrives as ``{"body": bytes}``
(or ``"data"``), a JSON body (``Content-Type: application/json``) already decoded to a dict,
multipart form fields under their field names, and gRPC ``input`` entries under their keys.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import os
import warnings
from http import HTTPStatus
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

try:  # inside the repository (package import)
    from .contract import HANDLER_DEFAULTS, SPEC_FILE
    from .preprocess import InputError
except ImportError:  # inside a .mar the shared modules sit flat beside the handler
    from contract import HANDLER_DEFAULTS, SPEC_FILE  # type: ignore[no-redef]
    from preprocess import InputError  # type: ignore[no-redef]

logger = logging.getLogger(__name__)

BODY_KEYS: tuple[str, ...] = ("data", "body")
"""Request fields that hold the payload, in order of preference, before task-specific names."""


def extract_body(row: Any, names: Sequence[str] = ()) -> bytes:
    """The encoded media bytes of one request.

    Accepts raw bytes, base64 text, JSON ``{"data" | <name>: "<base64>"}`` (optionally a
    ``data:...;base64,`` URI) and multipart/gRPC fields called ``data``, ``body``, one of
    ``names`` or, failing those, the request's only field. Raises ``InputError(400)``.
    """
    keys = (*BODY_KEYS, *names)
    value = row
    if isinstance(row, Mapping):
        value = _pick(row, keys)
    if isinstance(value, (bytes, bytearray)) and value[:1] in (b"{", b"\"") and _looks_json(value):
        value = json.loads(bytes(value).decode("utf-8"))  # JSON sent without a JSON content type
    if isinstance(value, Mapping):
        value = _pick(value, keys)
        if isinstance(value, (bytes, bytearray)):
            value = bytes(value).decode("ascii", "replace")
        if not isinstance(value, str):
            raise InputError(f"JSON body needs a base64 string under one of: {', '.join(keys)}", 400)
    if isinstance(value, str):
        return _b64decode(value)
    if isinstance(value, (bytes, bytearray)):
        if not value:
            raise InputError("empty request body", 400)
        return bytes(value)
    raise InputError(f"unsupported request payload of type {type(value).__name__}", 400)


def _pick(row: Mapping[str, Any], keys: Iterable[str]) -> Any:
    for key in keys:
        if key in row and row[key] is not None:
            return row[key]
    if len(row) == 1:  # a single multipart/gRPC field with another name
        return next(iter(row.values()))
    raise InputError(f"no payload found: send the media as the request body or in a field "
                     f"called one of: {', '.join(keys)}", 400)


def _looks_json(value: bytes | bytearray) -> bool:
    try:
        json.loads(bytes(value).decode("utf-8"))
        return True
    except (UnicodeDecodeError, ValueError):
        return False


def option_sources(row: Any) -> list[Mapping[str, Any]]:
    """Where per-request options can sit: the request's fields (form fields, gRPC inputs)
    and a JSON object body (with or without a JSON content type)."""
    if not isinstance(row, Mapping):
        return []
    sources: list[Mapping[str, Any]] = [row]
    for key in BODY_KEYS:
        body = row.get(key)
        if isinstance(body, (bytes, bytearray)) and body[:1] == b"{":
            try:
                body = json.loads(bytes(body).decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                body = None
        if isinstance(body, Mapping):
            sources.append(body)
    return sources


def _b64decode(text: str) -> bytes:
    text = text.strip()
    if text.startswith("data:") and "," in text:  # data URI
        text = text.split(",", 1)[1]
    text = "".join(text.split())
    if not text:
        raise InputError("empty base64 payload", 400)
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"payload is not valid base64: {e}", 400) from e
    if not data:
        raise InputError("empty base64 payload", 400)
    return data


def error_body(status: int, message: str) -> dict[str, Any]:
    """The JSON error a failed request gets: ``{"code", "type", "message"}``."""
    try:
        kind = HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    except ValueError:
        kind = "Error"
    return {"code": int(status), "type": kind, "message": message}


class Failures:
    """Per-request error bookkeeping for one batch: failed requests get their own 4xx/5xx."""

    def __init__(self) -> None:
        self.by_index: dict[int, dict[str, Any]] = {}

    def add(self, idx: int, status: int, message: str) -> None:
        """Mark request ``idx`` failed (the first failure of a request wins)."""
        self.by_index.setdefault(idx, error_body(status, message))

    def add_exception(self, idx: int, exc: BaseException, default_status: int = 500) -> None:
        """Mark ``idx`` failed from an exception; ``InputError`` carries its own status."""
        if isinstance(exc, InputError):
            self.add(idx, exc.status, str(exc))
        else:
            logger.error("request %d failed", idx, exc_info=exc)
            self.add(idx, default_status, f"{type(exc).__name__}: {exc}")

    def __contains__(self, idx: int) -> bool:
        return idx in self.by_index

    def __len__(self) -> int:
        return len(self.by_index)

    def apply(self, context: Any, results: list[Any]) -> list[Any]:
        """Put error bodies and statuses into ``results`` (one item per input) and the context.

        Normally every input is one TorchServe request with its own status. Behind a request
        envelope (``service_envelope=kserve|kservev2``) the inputs are the instances of one
        request, which has one status: 200 if every instance was answered, else the first
        failed instance's (each instance's answer or error stays in the body); behind the
        ``kservev2`` envelope each answer is JSON text, one BYTES output per input."""
        for idx, body in self.by_index.items():
            results[idx] = body
        n_requests = request_count(context)
        if n_requests is None or n_requests == len(results):
            for idx in range(len(results)):
                set_json_response(context, idx, self.by_index.get(idx, {}).get("code", 200))
        else:
            status = self.by_index[min(self.by_index)]["code"] if self.by_index else 200
            for idx in range(n_requests):
                set_json_response(context, idx, status)
        if hasattr(context, "input_names"):  # set by the kservev2 envelope while it runs
            # Open Inference Protocol BYTES elements are strings: each answer as JSON text (as
            # an object, KServe's model server would pass it on as a Python repr)
            results = [json.dumps(r) for r in results]
        return results


def request_count(context: Any) -> int | None:
    """How many TorchServe requests the batch holds (None outside TorchServe)."""
    processors = getattr(context, "_request_processor", None) if context is not None else None
    return None if processors is None else len(processors)


def set_json_response(context: Any, idx: int, status: int = 200) -> None:
    """Set request ``idx``'s status and JSON content type (no-op without a request processor)."""
    if request_count(context) is None:
        return
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    context.set_response_status(status, phrase, idx)
    context.set_response_content_type(idx, "application/json")


def topk(probs: Sequence[float], labels: Sequence[str], k: int = 3) -> list[dict[str, Any]]:
    """The ``k`` most probable labels, most probable first: ``[{"label", "probability"}]``."""
    order = sorted(range(len(probs)), key=lambda i: float(probs[i]), reverse=True)[:k]
    return [{"label": labels[i], "probability": round(float(probs[i]), 6)} for i in order]


class CropBatch:
    """Face crops from several requests flattened into one model batch, and split back.

    ``add(idx, box, detected, tensor)`` once per crop (in request order); after the forward
    pass, :meth:`split` gives each request its crops' boxes and output rows.
    """

    def __init__(self, n_requests: int) -> None:
        self.n_requests = n_requests
        self.owners: list[tuple[int, list[int], bool]] = []  # (request idx, box, detected)
        self.tensors: list[Any] = []
        self.failures = Failures()

    def add(self, idx: int, box: Sequence[float], detected: bool, tensor: Any) -> None:
        self.owners.append((idx, [int(round(v)) for v in box], bool(detected)))
        self.tensors.append(tensor)

    def __len__(self) -> int:
        return len(self.tensors)

    def split(self, rows: Sequence[Any]) -> list[list[tuple[list[int], bool, Any]]]:
        """Per request, its ``(box, detected, row)`` in the order they were added."""
        if len(rows) != len(self.owners):
            raise ValueError(f"{len(rows)} output rows for {len(self.owners)} crops")
        out: list[list[tuple[list[int], bool, Any]]] = [[] for _ in range(self.n_requests)]
        for (idx, box, detected), row in zip(self.owners, rows):
            out[idx].append((box, detected, row))
        return out


# --- model loading shared by the handlers (and export, which checks what it wrote) ------------
def handler_options(context: Any, task: str) -> dict[str, Any]:
    """The task's handler options: :data:`contract.HANDLER_DEFAULTS` overridden by the
    ``handler:`` section of the archive's ``model-config.yaml`` (when there is one)."""
    yaml_cfg = getattr(context, "model_yaml_config", None) or {}
    return {**HANDLER_DEFAULTS[task], **(yaml_cfg.get("handler") or {})}


def cgroup_cpu_limit(root: str | os.PathLike = "/sys/fs/cgroup") -> float | None:
    """The CPU limit of this process's cgroup (a container's ``limits.cpu``), in CPUs, or None
    when there is none: cgroup v2's ``cpu.max`` ("200000 100000" = 2 CPUs, "max ..." = none),
    else cgroup v1's ``cpu/cpu.cfs_quota_us`` over ``cpu.cfs_period_us`` (-1 = none)."""
    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        q, per = int(quota), int(period)
    except ValueError:  # "max": no limit
        return None
    return q / per if q > 0 and per > 0 else None


def usable_cpus(cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> int:
    """The CPUs this process can really use: its affinity mask (``taskset``, a cpuset), capped by
    its cgroup's CPU limit (rounded up). ``os.cpu_count()`` counts the whole machine, which in a
    container is the node's cores, not the pod's limit."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root)
    return max(1, min(cpus, math.ceil(limit)) if limit else cpus)


def select_device(context: Any, options: Mapping[str, Any]) -> torch.device:
    """The worker's GPU if TorchServe gave it one; else the CPU with ``threads`` threads
    (``options["threads"]``, 0 = the usable cores, :func:`usable_cpus`, shared among
    ``maxWorkers`` workers)."""
    gpu_id = context.system_properties.get("gpu_id")
    if torch.cuda.is_available() and gpu_id is not None:
        return torch.device(f"cuda:{gpu_id}")
    yaml_cfg = getattr(context, "model_yaml_config", None) or {}
    threads = int(options.get("threads", 0) or 0) or max(
        1, usable_cpus() // max(1, int(yaml_cfg.get("maxWorkers", 1))))
    torch.set_num_threads(threads)
    return torch.device("cpu")


def load_scripted(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                  ) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """A TorchScript file written by ``export`` (eval mode, on ``map_location``) and the spec
    stored inside it (:data:`contract.SPEC_FILE`)."""
    extra = {SPEC_FILE: ""}
    with warnings.catch_warnings():  # TorchScript's deprecation notice, not actionable here
        warnings.filterwarnings("ignore", message=r".*is deprecated", category=FutureWarning)
        module = torch.jit.load(str(path), map_location=map_location, _extra_files=extra)
    if not extra[SPEC_FILE]:
        raise RuntimeError(f"{path}: no {SPEC_FILE} inside the TorchScript file")
    return module.eval(), json.loads(extra[SPEC_FILE])


def load_scripted_model(context: Any, device: torch.device) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """The archive's TorchScript model (eval mode, on ``device``) and the spec stored inside it."""
    model_dir = context.system_properties["model_dir"]
    return load_scripted(os.path.join(model_dir, context.manifest["model"]["serializedFile"]), device)
