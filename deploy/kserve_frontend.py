"""KServe's own model server (the ``kserve`` package) in front of TorchServe, as in KServe's
TorchServe runtime, where the image's ``kserve_wrapper`` does this (it is not on PyPI).

``python -m deploy.kserve_frontend --ts-config deploy/kserve/store/config/config.properties [--http-port 8080]``

One KServe model per model of the config's ``model_snapshot``, each forwarding to TorchServe's
``inference_address`` with the protocol of its ``service_envelope`` (``kserve``: v1,
``kservev2``: v2). KServe answers the health and metadata routes itself
(``/v2/health/ready``, ``/v2/models/<name>``, ``/v1/models/<name>``) and passes
``/v1/models/<name>:predict`` and ``/v2/models/<name>/infer`` on to TorchServe, with the
client's ``Authorization`` header.

Needs the ``kserve`` package, which is kept out of the project's venv (its pins downgrade
protobuf, grpcio-tools and psutil): ``make kserve-venv`` installs it in ``deploy/.kserve-venv``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from kserve import Model, ModelServer
from kserve.model import PredictorConfig

from handlers.contract import KSERVE_HTTP_PORT, SERVICE_ENVELOPES
from serving.torchserve import read_properties

logger = logging.getLogger(__name__)


class TorchServeModel(Model):
    """A KServe model whose predictions come from TorchServe (KServe's default ``predict``)."""

    def load(self) -> bool:
        self.ready = True
        return self.ready


def predictor_config(props: dict[str, str]) -> PredictorConfig:
    """Where and how to reach TorchServe, from its config.properties."""
    protocols = {envelope: version for version, envelope in SERVICE_ENVELOPES.items()}
    envelope = props.get("service_envelope", "")
    if envelope not in protocols:
        raise ValueError(f"service_envelope={envelope!r}: KServe needs one of {', '.join(protocols)}")
    host = props["inference_address"].split("://", 1)[1]
    return PredictorConfig(predictor_host=host, predictor_protocol=protocols[envelope])


def model_names(props: dict[str, str]) -> list[str]:
    """The models of the config's ``model_snapshot``."""
    return list(json.loads(props["model_snapshot"])["models"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deploy.kserve_frontend", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ts-config", type=Path, required=True, help="the store's config.properties")
    p.add_argument("--http-port", type=int, default=KSERVE_HTTP_PORT)
    return p.parse_known_args(argv)[0]  # KServe parses the command line too


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    props = read_properties(args.ts_config)
    models = [TorchServeModel(name) for name in model_names(props)]
    for model in models:
        model.load()
    server = ModelServer(http_port=args.http_port, enable_grpc=False, predictor_config=predictor_config(props))
    logger.info("KServe model server on port %d for %s -> %s", args.http_port,
                ", ".join(m.name for m in models), props["inference_address"])
    server.start(models)
    return 0


if __name__ == "__main__":
    sys.exit(main())
