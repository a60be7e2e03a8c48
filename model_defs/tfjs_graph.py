"""Read a TensorFlow.js graph model (``model.json`` + weight shards) into NumPy arrays.

Only what a converter needs: the graph's nodes (name, op, inputs, attributes) and its named
weights, dequantized to float32. No TensorFlow is involved; the format is the one written by
``tensorflowjs_converter`` (``format: graph-model``): a JSON ``modelTopology`` (a TF GraphDef
as JSON) and a ``weightsManifest`` listing, per shard file, the weights in byte order.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_DTYPES = {"float32": np.float32, "int32": np.int32, "bool": np.bool_, "uint8": np.uint8,
           "uint16": np.uint16, "float16": np.float16}


@dataclass
class GraphNode:
    name: str
    op: str
    inputs: list[str]
    attr: dict[str, Any] = field(default_factory=dict)

    def string_attr(self, key: str) -> str:
        """A string attribute (TF.js stores them base64-encoded), '' when absent."""
        s = self.attr.get(key, {}).get("s")
        return base64.b64decode(s).decode() if s else ""

    def int_list_attr(self, key: str) -> list[int]:
        return [int(i) for i in self.attr.get(key, {}).get("list", {}).get("i", [])]


@dataclass
class TfjsGraph:
    nodes: list[GraphNode]
    weights: dict[str, np.ndarray]
    meta: dict[str, Any]

    def ops(self, op: str) -> list[GraphNode]:
        """The nodes of one op type, in graph order."""
        return [n for n in self.nodes if n.op == op]


def _read_weights(manifest: list[dict[str, Any]], folder: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for group in manifest:
        data = b"".join((folder / p).read_bytes() for p in group["paths"])
        offset = 0
        for w in group["weights"]:
            shape = [int(s) for s in w["shape"]]
            count = int(np.prod(shape)) if shape else 1
            quant = w.get("quantization")
            dtype = np.dtype(_DTYPES[quant["dtype"] if quant else w["dtype"]])
            raw = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
            offset += count * dtype.itemsize
            if quant and quant["dtype"] in ("uint8", "uint16"):
                raw = raw.astype(np.float32) * float(quant["scale"]) + float(quant["min"])
            out[w["name"]] = raw.astype(np.float32 if w["dtype"] == "float32" else raw.dtype).reshape(shape)
        if offset != len(data):
            raise ValueError(f"weight shards of {folder} hold {len(data)} bytes, the manifest lists {offset}")
    return out


def read_tfjs_graph(model_json: str | Path) -> TfjsGraph:
    """Parse ``model_json`` and the weight shards beside it."""
    path = Path(model_json)
    d = json.loads(path.read_text())
    if d.get("format") != "graph-model":
        raise ValueError(f"{path}: not a TF.js graph model (format {d.get('format')!r})")
    nodes = [GraphNode(n["name"], n["op"], list(n.get("input", [])), n.get("attr", {}))
             for n in d["modelTopology"]["node"]]
    meta = {k: d.get(k) for k in ("generatedBy", "convertedBy", "signature")}
    return TfjsGraph(nodes, _read_weights(d["weightsManifest"], path.parent), meta)
