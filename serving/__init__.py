"""Running the service: TorchServe's start, stop and readiness (``make serve``, tests,
benchmarks) and a gRPC client.

``python -m serving start|stop`` from the command line; :func:`running_server` from Python.
"""
from .torchserve import (CONFIG, TorchServe, live_server_pid, machine_lock, read_properties, running_server,
                         serving, stop_server)

__all__ = ["CONFIG", "TorchServe", "live_server_pid", "machine_lock", "read_properties", "running_server",
           "serving", "stop_server"]
