"""The demo server (demo/server.py) on its own: loopback only, its own page only, and a relay
that adds the key and hands back TorchServe's answer (a stand-in upstream records what it got)."""
from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
import requests

from demo.server import DemoSettings, make_server, parse_args, served_models, settings_from_args
from model_defs import LABELS

MODELS = served_models()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(server: ThreadingHTTPServer) -> Iterator[None]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def upstream():
    """A stand-in for TorchServe's inference API: records requests, answers 200 or a 400 JSON."""
    seen: list[dict] = []

    class Upstream(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"),
                         "ctype": self.headers.get("Content-Type"), "body": body, "headers": dict(self.headers)})
            if body == b"slow":
                time.sleep(0.5)
            status, answer = (400, {"code": 400, "type": "BadRequest", "message": "bad"}) if body == b"bad" \
                else (200, {"faces": []})
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    with running(server):
        yield f"http://127.0.0.1:{server.server_address[1]}", seen


def settings(tmp_path: Path, inference_url: str, key: str | None = "the-key") -> DemoSettings:
    key_file = tmp_path / "key_file.json"
    if key is not None:
        key_file.write_text(json.dumps({"management": {"key": "m"}, "inference": {"key": key}}))
    return DemoSettings(host="127.0.0.1", port=free_port(), inference_url=inference_url, key_file=key_file,
                        models=MODELS, labels=tuple(LABELS), max_body=1000)


def test_refuses_to_listen_beyond_loopback_unless_told(tmp_path):
    s = settings(tmp_path, "http://127.0.0.1:1")
    remote = DemoSettings(**{**s.__dict__, "host": "0.0.0.0"})
    with pytest.raises(PermissionError, match="loopback only"):
        make_server(remote)
    make_server(remote, allow_remote=True).server_close()


def test_defaults_come_from_config_properties():
    s = settings_from_args(parse_args([]))
    assert (s.host, s.port, s.inference_url) == ("127.0.0.1", 8090, "http://127.0.0.1:8080")
    assert s.models == MODELS and s.labels == tuple(LABELS) and s.max_body == 64 * 1024 * 1024


def test_relay_adds_the_key_and_returns_torchserves_answer(tmp_path, upstream):
    url, seen = upstream
    s = settings(tmp_path, url)
    with running(make_server(s)):
        base = s.origin
        r = requests.post(f"{base}/predictions/{MODELS['image']}", files={"data": ("a.jpg", b"jpeg", "image/jpeg")})
        assert r.status_code == 200 and r.json() == {"faces": []}
        assert seen[-1]["path"] == f"/predictions/{MODELS['image']}" and seen[-1]["auth"] == "Bearer the-key"
        assert seen[-1]["ctype"].startswith("multipart/form-data") and b"jpeg" in seen[-1]["body"]
        r = requests.post(f"{base}/predictions/{MODELS['video']}", data=b"bad", headers={"Content-Type": "video/mp4"})
        assert r.status_code == 400 and r.json()["message"] == "bad" and seen[-1]["ctype"] == "video/mp4"
        # only the two models, within the size limit, from this page or no page
        assert requests.post(f"{base}/predictions/other", data=b"x").status_code == 404
        assert requests.post(f"{base}/models", data=b"x").status_code == 404
        assert requests.post(f"{base}/predictions/{MODELS['image']}", data=b"x" * 1001).status_code == 413
        r = requests.post(f"{base}/predictions/{MODELS['image']}", data=b"x", headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
        r = requests.get(f"{base}/", headers={"Host": f"rebound.example:{s.port}"})
        assert r.status_code == 403
    assert len(seen) == 2


def test_live_frames_go_through_per_tab_with_one_in_flight_and_a_rate_cap(tmp_path, upstream):
    """/live relays a tab's frames to the live model with the tab's sequence id; one frame of a tab
    in flight and at most MAX_FPS a second (429 JSON), frames over the limit 413, no id 400."""
    from demo import live_relay
    from handlers.contract import LIVE_MAX_FRAME_BYTES, LIVE_SEQUENCE_END_HEADER, LIVE_SEQUENCE_HEADER

    url, seen = upstream
    s = settings(tmp_path, url)
    tab = {live_relay.SEQUENCE_HEADER: "tab-0123456789"}
    with running(make_server(s)):
        live = f"{s.origin}{live_relay.LIVE_PATH}"
        assert requests.post(f"{s.origin}/predictions/{MODELS['live']}", data=b"x").status_code == 404
        r = requests.post(live, data=b"frame", headers=tab)
        assert r.status_code == 200 and seen[-1]["path"] == f"/predictions/{MODELS['live']}"
        assert seen[-1]["headers"][LIVE_SEQUENCE_HEADER] == "tab-0123456789" and seen[-1]["auth"] == "Bearer the-key"
        r = requests.post(live, data=b"frame", headers=tab)  # sooner than 1 / MAX_FPS after the last
        assert r.status_code == 429 and "frames a second per tab" in r.json()["message"]
        time.sleep(0.2)
        slow = threading.Thread(target=requests.post, args=(live,), kwargs={"data": b"slow", "headers": tab})
        slow.start()
        time.sleep(0.25)
        r = requests.post(live, data=b"frame", headers=tab)  # while the slow one is in flight
        assert r.status_code == 429 and r.json()["type"] == "TooManyRequests" and "one frame at a time" in r.json()["message"]
        other = requests.post(live, data=b"frame", headers={live_relay.SEQUENCE_HEADER: "tab-another-one"})
        assert other.status_code == 200  # another tab is not held up
        slow.join()
        time.sleep(0.1)
        r = requests.post(live, data=b"x" * (LIVE_MAX_FRAME_BYTES + 1), headers=tab)
        assert r.status_code == 413 and "byte limit" in r.json()["message"]
        r = requests.post(live, data=b"frame", headers={live_relay.SEQUENCE_HEADER: "no"})
        assert r.status_code == 400 and live_relay.SEQUENCE_HEADER in r.json()["message"]
        r = requests.post(live, data=b"", headers={**tab, live_relay.END_HEADER: "1"})
        assert r.status_code == 200 and seen[-1]["headers"][LIVE_SEQUENCE_END_HEADER] == "true"
    assert [x["body"] for x in seen] == [b"frame", b"slow", b"frame", b""]


def test_explanations_are_relayed_too(tmp_path, upstream):
    url, seen = upstream
    s = settings(tmp_path, url)
    with running(make_server(s)):
        r = requests.post(f"{s.origin}/explanations/{MODELS['image']}", files={"data": ("a.jpg", b"jpeg", "image/jpeg")})
        assert r.status_code == 200 and r.json() == {"faces": []}
        assert seen[-1]["path"] == f"/explanations/{MODELS['image']}" and seen[-1]["auth"] == "Bearer the-key"
        assert requests.post(f"{s.origin}/explanations/other", data=b"x").status_code == 404
        assert requests.post(f"{s.origin}/describe/{MODELS['image']}", data=b"x").status_code == 404
    assert len(seen) == 1


def test_page_and_its_settings(tmp_path):
    s = settings(tmp_path, "http://127.0.0.1:1", key=None)
    with running(make_server(s)):
        page = requests.get(f"{s.origin}/")
        assert page.status_code == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
        assert "connect-src 'self';" in page.headers["Content-Security-Policy"] and "app.js" in page.text
        assert requests.get(f"{s.origin}/app.js").headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert requests.get(f"{s.origin}/../server.py").status_code == 404
        cfg = requests.get(f"{s.origin}/config.json").json()
        assert cfg["labels"] == list(LABELS) and cfg["models"] == MODELS and set(cfg["colors"]) == set(LABELS)
        assert 0 < cfg["why"]["floor"] < 1 and 0 < cfg["why"]["alpha"] <= 255
        assert cfg["key_found"] is False and "make serve" in cfg["error"] and "key" not in cfg


def test_no_key_or_no_torchserve_is_a_readable_error(tmp_path):
    s = settings(tmp_path, f"http://127.0.0.1:{free_port()}", key=None)
    with running(make_server(s)):
        r = requests.post(f"{s.origin}/predictions/{MODELS['image']}", data=b"x")
        assert r.status_code == 503 and r.json()["type"] == "NoInferenceKey" and "make serve" in r.json()["message"]
        s.key_file.write_text(json.dumps({"inference": {"key": "k"}}))
        r = requests.post(f"{s.origin}/predictions/{MODELS['image']}", data=b"x")
        assert r.status_code == 502 and r.json()["message"].startswith(f"no answer from TorchServe at {s.inference_url}")
