"""The benchmark's load generator against a real local HTTP server: counts, errors, bodies."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.loadgen import RestClient, parse_response, run_load


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if body == b"fail":
            self._answer(500, b'{"code": 500}')
        elif body == b"chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"chun", b"ked"):
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._answer(200, self.headers.get("Authorization", "").encode() + b":" + body)

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/predictions/m"
    server.shutdown()
    server.server_close()


def test_client_sends_headers_and_reads_bodies(url):
    client = RestClient(url, {"Authorization": "Bearer k"})
    assert client(b"abc") and client.last_body == b"Bearer k:abc"
    assert client(b"chunked") and client.last_body == b"chunked"
    assert not client(b"fail") and client.last_error.startswith("HTTP 500")
    assert client(b"again") and client.last_body == b"Bearer k:again"  # same connection still usable
    client.close()


@pytest.mark.parametrize("concurrency", [1, 4])
def test_run_load_counts_every_request(url, concurrency):
    payloads = [b"a", b"fail", b"b", b"chunked"]
    r = run_load(lambda: RestClient(url, {}), payloads, concurrency, 40, 30.0, warmup=0)
    assert (r.sent, r.ok, r.errors) == (40, 30, 10)
    assert r.first_error.startswith("HTTP 500")
    assert r.rps > 0 and 0 < r.p50_ms <= r.p99_ms


def test_run_load_stops_at_the_time_limit(url):
    r = run_load(lambda: RestClient(url, {}), [b"x"], 2, 10**9, 0.5, warmup=0)
    assert 0 < r.sent < 10**9 and r.errors == 0 and r.wall_s < 5


def test_parse_response_waits_for_the_whole_body():
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + b"HTTP/1.1 404"
    assert parse_response(raw[:30]) is None
    assert parse_response(raw) == (200, True, b"hello", b"HTTP/1.1 404")
