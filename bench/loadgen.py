"""A bounded load generator on loopback: a fixed number of requests (or a time limit, whichever
comes first) sent by ``concurrency`` threads, each with its own keep-alive connection.

    result = run_load(lambda: RestClient(url, headers), payloads, concurrency=8, n_requests=500)
    result.rps, result.p50_ms, result.p99_ms
"""
from __future__ import annotations

import http.client
import itertools
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

import numpy as np

Send = Callable[[bytes], bool]


@dataclass
class LoadResult:
    """What one load level gave: counts, throughput and latency percentiles (ms)."""

    name: str
    concurrency: int
    sent: int
    ok: int
    errors: int
    wall_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    first_error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RestClient:
    """``POST`` bodies to one URL over one keep-alive HTTP/1.1 connection (reconnects on error)."""

    def __init__(self, url: str, headers: dict[str, str], timeout: float = 300.0) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname, parts.port or 80, parts.path
        self.headers = {"Content-Type": "application/octet-stream", **headers}
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None
        self.last_body = b""
        self.last_error = ""

    def __call__(self, body: bytes) -> bool:
        for attempt in (0, 1):  # a keep-alive connection closed by the server is retried once
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                self.conn.request("POST", self.path, body, self.headers)
                resp = self.conn.getresponse()
                self.last_body = resp.read()
                if resp.status != 200:
                    self.last_error = f"HTTP {resp.status}: {self.last_body[:200]!r}"
                return resp.status == 200
            except (http.client.HTTPException, OSError) as e:
                self.close()
                self.last_error = f"{type(e).__name__}: {e}"
                if attempt:
                    return False
        return False

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class GrpcClient:
    """TorchServe ``Predictions`` calls over one gRPC channel (stubs from tests/grpc_client.py)."""

    def __init__(self, target: str, model: str, token: str, timeout: float = 300.0) -> None:
        import grpc

        from tests.grpc_client import load_stubs

        stubs = load_stubs()
        self.pb2 = stubs["inference_pb2"]
        self.channel = grpc.insecure_channel(target)
        self.stub = stubs["inference_pb2_grpc"].InferenceAPIsServiceStub(self.channel)
        self.model = model
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.timeout = timeout
        self.last_body = b""
        self.last_error = ""

    def __call__(self, body: bytes) -> bool:
        try:
            req = self.pb2.PredictionsRequest(model_name=self.model, input={"data": body})
            self.last_body = self.stub.Predictions(req, metadata=self.metadata, timeout=self.timeout).prediction
            return True
        except Exception as e:  # grpc.RpcError and friends: counted as errors
            self.last_error = f"{type(e).__name__}: {e}"
            return False

    def close(self) -> None:
        self.channel.close()


def percentile_ms(latencies: Sequence[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(latencies) * 1000.0, q)), 2) if latencies else float("nan")


def run_load(make_client: Callable[[], Any], payloads: Sequence[bytes], concurrency: int,
             n_requests: int, time_limit: float, warmup: int | None = None, name: str = "") -> LoadResult:
    """Send ``n_requests`` (cycling through ``payloads``) from ``concurrency`` threads, or as many
    as fit in ``time_limit`` seconds; ``warmup`` requests per thread first (not counted).

    Throughput is successful requests over the time from the common start to the last answer.
    """
    warmup = max(1, min(3, n_requests // (4 * concurrency))) if warmup is None else warmup
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    ok, sent = [0], [0]
    clients = [make_client() for _ in range(concurrency)]
    for i, client in enumerate(clients):  # warm-up: connections opened, worker caches hot
        for j in range(warmup):
            client(payloads[(i + j) % len(payloads)])
    start_barrier = threading.Barrier(concurrency + 1)
    state = {"start": 0.0, "deadline": 0.0, "last": 0.0}

    def worker(client: Any) -> None:
        mine: list[float] = []
        my_ok, my_sent, my_err = 0, 0, []
        start_barrier.wait()
        while True:
            i = next(counter)
            if i >= n_requests or time.perf_counter() > state["deadline"]:
                break
            my_sent += 1
            t = time.perf_counter()
            good = client(payloads[i % len(payloads)])
            done = time.perf_counter()
            if good:
                mine.append(done - t)
                my_ok += 1
            elif not my_err:
                my_err.append(client.last_error)
        with lock:
            latencies.extend(mine)
            ok[0] += my_ok
            sent[0] += my_sent
            errors.extend(my_err)
            state["last"] = max(state["last"], time.perf_counter())

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in clients]
    for th in threads:
        th.start()
    state["start"] = time.perf_counter()
    state["deadline"] = state["start"] + time_limit
    start_barrier.wait()
    for th in threads:
        th.join()
    for c in clients:
        c.close()
    wall = max(state["last"] - state["start"], 1e-9)
    return LoadResult(name=name, concurrency=concurrency, sent=sent[0], ok=ok[0], errors=sent[0] - ok[0],
                      wall_s=round(wall, 3), rps=round(ok[0] / wall, 2),
                      p50_ms=percentile_ms(latencies, 50), p90_ms=percentile_ms(latencies, 90),
                      p99_ms=percentile_ms(latencies, 99),
                      mean_ms=round(1000 * float(np.mean(latencies)), 2) if latencies else float("nan"),
                      first_error=errors[0] if errors else "")
