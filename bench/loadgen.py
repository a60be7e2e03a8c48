"""A bounded load generator on loopback: a fixed number of requests (or a time limit, whichever
comes first) sent over ``concurrency`` keep-alive connections, one request in flight on each.

    result = run_load(lambda: RestClient(url, headers), payloads, concurrency=8, n_requests=500)
    result.rps, result.p50_ms, result.p99_ms
"""
from __future__ import annotations

import itertools
import selectors
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

import numpy as np

from serving.grpc_client import load_stubs

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


def parse_response(buf: bytes) -> tuple[int, bool, bytes, bytes] | None:
    """One complete HTTP/1.1 response from the front of ``buf``: ``(status, keep_alive, body,
    rest of buf)``, or None while incomplete. Bodies by ``Content-Length`` or chunked."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buf[:end].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    keep_alive = fields.get("connection", "").lower() != "close"
    pos = end + 4
    if "content-length" in fields:
        n = int(fields["content-length"])
        return (status, keep_alive, buf[pos:pos + n], buf[pos + n:]) if len(buf) >= pos + n else None
    if fields.get("transfer-encoding", "").lower() != "chunked":
        raise ValueError(f"HTTP {status} response without Content-Length or chunked body")
    parts = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(buf[pos:eol].split(b";")[0], 16)
        if len(buf) < eol + 2 + size + 2:
            return None
        parts.append(buf[eol + 2:eol + 2 + size])
        pos = eol + 2 + size + 2
        if size == 0:
            return status, keep_alive, b"".join(parts), buf[pos:]


class RestClient:
    """``POST`` bodies to one URL over one keep-alive HTTP/1.1 connection (reconnects on error).

    A plain socket client: each payload's request bytes are built once, and responses are read
    by :func:`parse_response`. On this 2-core machine the client shares the CPU with the server
    it measures: ``http.client`` in 32 threads cost 0.15 ms of CPU per request, this (driven by
    :func:`run_load`'s single-thread event loop) about a third of that (bench/README.md).
    """

    def __init__(self, url: str, headers: dict[str, str], timeout: float = 300.0) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
        fields = {"Host": f"{self.host}:{self.port}", "Content-Type": "application/octet-stream", **headers}
        self.head = (f"POST {self.path} HTTP/1.1\r\n"
                     + "".join(f"{k}: {v}\r\n" for k, v in fields.items())).encode("latin-1")
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buf = b""
        self.requests: dict[int, bytes] = {}  # id(body) -> the request's bytes
        self.last_body = b""
        self.last_error = ""

    def send(self, body: bytes) -> None:
        """Send one request (connecting first if needed); the answer is read by :meth:`feed`."""
        req = self.requests.get(id(body))
        if req is None:
            req = self.head + f"Content-Length: {len(body)}\r\n\r\n".encode("latin-1") + body
            self.requests[id(body)] = req
        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buf = b""
        self.sock.sendall(req)

    def feed(self) -> bool | None:
        """Read what has arrived; True/False (200 or not) once a whole response is in, else None.
        Raises ``ConnectionError`` when the server closed the connection."""
        chunk = self.sock.recv(1 << 16)  # type: ignore[union-attr]
        if not chunk:
            raise ConnectionError("connection closed by the server")
        self.buf += chunk
        done = parse_response(self.buf)
        if done is None:
            return None
        status, keep_alive, self.last_body, self.buf = done
        if not keep_alive:
            self.close()
        if status != 200:
            self.last_error = f"HTTP {status}: {self.last_body[:200]!r}"
        return status == 200

    def __call__(self, body: bytes) -> bool:
        for attempt in (0, 1):  # a keep-alive connection closed by the server is retried once
            try:
                self.send(body)
                while (good := self.feed()) is None:
                    pass
                return good
            except (OSError, ValueError) as e:
                self.close()
                self.last_error = f"{type(e).__name__}: {e}"
                if attempt:
                    return False
        return False

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class GrpcClient:
    """TorchServe ``Predictions`` calls over one gRPC channel (stubs from serving/grpc_client.py)."""

    def __init__(self, target: str, model: str, token: str, timeout: float = 300.0) -> None:
        import grpc  # here, not at the top: only the gRPC rows need it (heavy)

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
    """Send ``n_requests`` (cycling through ``payloads``) over ``concurrency`` connections, or as
    many as fit in ``time_limit`` seconds; ``warmup`` requests per connection first (not counted).

    :class:`RestClient` connections are driven by one thread with a selector (each connection
    has one request in flight at a time); other clients (gRPC) get a thread each. Throughput is
    successful requests over the time from the common start to the last answer.
    """
    warmup = max(1, min(3, n_requests // (4 * concurrency))) if warmup is None else warmup
    clients = [make_client() for _ in range(concurrency)]
    for i, client in enumerate(clients):  # warm-up: connections opened, worker caches hot
        for j in range(warmup):
            client(payloads[(i + j) % len(payloads)])
    drive = _drive_selector if all(isinstance(c, RestClient) for c in clients) else _drive_threads
    try:
        start, last, latencies, sent, errors = drive(clients, payloads, n_requests, time_limit)
    finally:
        for c in clients:
            c.close()
    ok = len(latencies)
    wall = max(last - start, 1e-9)
    return LoadResult(name=name, concurrency=concurrency, sent=sent, ok=ok, errors=sent - ok,
                      wall_s=round(wall, 3), rps=round(ok / wall, 2),
                      p50_ms=percentile_ms(latencies, 50), p90_ms=percentile_ms(latencies, 90),
                      p99_ms=percentile_ms(latencies, 99),
                      mean_ms=round(1000 * float(np.mean(latencies)), 2) if latencies else float("nan"),
                      first_error=errors[0] if errors else "")


Driven = tuple[float, float, list[float], int, list[str]]  # start, last answer, latencies, sent, errors


def _drive_selector(clients: Sequence[RestClient], payloads: Sequence[bytes], n_requests: int,
                    time_limit: float) -> Driven:
    """One thread, one request in flight per connection, answers read as they arrive."""
    latencies: list[float] = []
    errors: list[str] = []
    sel = selectors.DefaultSelector()
    started: dict[int, float] = {}
    sent = 0
    start = time.perf_counter()
    deadline = start + time_limit
    last = start

    def launch(k: int) -> None:
        nonlocal sent
        client = clients[k]
        while sent < n_requests and time.perf_counter() <= deadline:
            i = sent
            sent += 1
            try:
                client.send(payloads[i % len(payloads)])
            except OSError as e:  # counted as a failed request; try the next one
                client.close()
                errors.append(f"{type(e).__name__}: {e}")
                continue
            started[k] = time.perf_counter()
            sel.register(client.sock, selectors.EVENT_READ, k)  # type: ignore[arg-type]
            return

    for k in range(len(clients)):
        launch(k)
    while started:
        for key, _ in sel.select(timeout=max(1.0, clients[0].timeout)):
            k = key.data
            client = clients[k]
            try:
                good = client.feed()
            except (OSError, ValueError) as e:
                good = False
                client.last_error = f"{type(e).__name__}: {e}"
            if good is None:
                continue
            now = time.perf_counter()
            sel.unregister(key.fileobj)
            t0 = started.pop(k)
            if good:
                latencies.append(now - t0)
                last = now
            else:
                errors.append(client.last_error)
                client.close()
            launch(k)
    sel.close()
    return start, last, latencies, sent, errors


def _drive_threads(clients: Sequence[Any], payloads: Sequence[bytes], n_requests: int,
                   time_limit: float) -> Driven:
    """A thread per client, each sending its next request when the last is answered."""
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    sent = [0]
    start_barrier = threading.Barrier(len(clients) + 1)
    state = {"start": 0.0, "deadline": 0.0, "last": 0.0}

    def worker(client: Any) -> None:
        mine: list[float] = []
        my_sent, my_err = 0, []
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
            elif not my_err:
                my_err.append(client.last_error)
        with lock:
            latencies.extend(mine)
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
    return state["start"], state["last"], latencies, sent[0], errors
