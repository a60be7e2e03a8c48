"""gRPC client for the service, with Python stubs built from TorchServe's own protos.

The ``.proto`` files ship inside ``ts/frontend/model-server.jar``; :func:`load_stubs`
extracts ``inference.proto`` and ``management.proto`` and compiles them with
``grpc_tools.protoc`` (``google/rpc/status.proto`` comes from googleapis-common-protos)
into ``build/grpc_stubs/`` (git-ignored), once (``make grpc-stubs``). From the command line::

    .venv/bin/python -m serving.grpc_client --key-file key_file.json face.jpg
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STUB_DIR = REPO / "build" / "grpc_stubs"
PROTOS = ("inference.proto", "management.proto")


def _jar_path() -> Path:
    import ts  # here, not at the top: only stub generation needs TorchServe's jar

    return Path(ts.__file__).resolve().parent / "frontend" / "model-server.jar"


def generate_stubs(out_dir: Path = STUB_DIR) -> Path:
    """Extract TorchServe's protos from its jar and compile them to Python into ``out_dir``."""
    # here, not at the top: the protobuf compiler is heavy and only stub generation needs it
    import google.rpc.status_pb2  # noqa: F401  (googleapis-common-protos must be installed)
    import grpc_tools
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    googleapis_root = Path(sys.modules["google.rpc.status_pb2"].__file__).resolve().parents[2]
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(_jar_path()) as jar:
        src, gen = Path(tmp) / "src", Path(tmp) / "gen"
        src.mkdir()
        gen.mkdir()
        for name in PROTOS:
            (src / name).write_bytes(jar.read(name))
        args = ["grpc_tools.protoc", f"-I{src}", f"-I{googleapis_root}", f"-I{well_known}",
                f"--python_out={gen}", f"--grpc_python_out={gen}", *PROTOS]
        if protoc.main(args) != 0:
            raise RuntimeError(f"grpc_tools.protoc failed: {' '.join(args)}")
        for f in gen.glob("*.py"):  # rename into place: concurrent generators cannot clash
            tmp_dst = out_dir / f".{f.name}.{os.getpid()}"
            tmp_dst.write_bytes(f.read_bytes())
            os.replace(tmp_dst, out_dir / f.name)
    return out_dir


def load_stubs(out_dir: Path = STUB_DIR) -> dict[str, ModuleType]:
    """The generated modules: ``inference_pb2``, ``inference_pb2_grpc``, ``management_pb2``, ``management_pb2_grpc``."""
    names = ("inference_pb2", "inference_pb2_grpc", "management_pb2", "management_pb2_grpc")
    if not all((out_dir / f"{n}.py").is_file() for n in names):
        generate_stubs(out_dir)
    if str(out_dir) not in sys.path:  # generated *_grpc modules import their *_pb2 flat
        sys.path.insert(0, str(out_dir))
    return {n: importlib.import_module(n) for n in names}


def predict_raw(target: str, model: str, data: bytes, token: str | None, timeout: float = 60.0,
                fields: dict[str, bytes] | None = None) -> Any:
    """One ``Predictions`` call (``fields``: more ``input`` entries, the handlers' per-request
    options); returns the ``PredictionResponse`` message."""
    import grpc  # here, not at the top: only gRPC calls need it (heavy)

    stubs = load_stubs()
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(target) as channel:
        stub = stubs["inference_pb2_grpc"].InferenceAPIsServiceStub(channel)
        req = stubs["inference_pb2"].PredictionsRequest(model_name=model, input={"data": data, **(fields or {})})
        return stub.Predictions(req, metadata=metadata, timeout=timeout)


def predict(target: str, model: str, data: bytes, token: str | None, timeout: float = 60.0) -> Any:
    """One ``Predictions`` call; returns the decoded JSON answer (errors are JSON too)."""
    return json.loads(predict_raw(target, model, data, token, timeout).prediction)


def explain(target: str, model: str, data: bytes, token: str | None, timeout: float = 120.0,
            label: str | None = None) -> Any:
    """The explanations answer over gRPC: TorchServe 0.12's ``inference.proto`` has no
    ``Explanations`` RPC, so this is a ``Predictions`` call with the input ``explain=true`` (and
    ``target``, the label to explain; default the top one), which the handlers answer as
    ``POST /explanations``."""
    fields = {"explain": b"true", **({"target": label.encode()} if label else {})}
    return json.loads(predict_raw(target, model, data, token, timeout, fields).prediction)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.grpc_client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=Path, help="image (or video) to send")
    p.add_argument("--model", default="emotion_image")
    p.add_argument("--target", default="127.0.0.1:7070")
    p.add_argument("--key-file", type=Path, default=Path("key_file.json"),
                   help="TorchServe's key_file.json (its inference key is sent)")
    p.add_argument("--explain", action="store_true", help="ask for explanations (a map per face)")
    p.add_argument("--label", help="with --explain: the label to explain (default: each face's top label)")
    args = p.parse_args(argv)
    token = json.loads(args.key_file.read_text())["inference"]["key"] if args.key_file.is_file() else None
    data = args.file.read_bytes()
    if args.explain:
        answer = explain(args.target, args.model, data, token, label=args.label)
    else:
        answer = predict(args.target, args.model, data, token)
    print(json.dumps(answer, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
