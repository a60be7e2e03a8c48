"""Serve the demo page (``demo/static/``) beside a running TorchServe: ``python -m demo.server``.

The page posts photos and clips to ``/predictions/<model>`` on this server (and a photo to
``/explanations/<model>`` for its "why" maps) and webcam frames to ``/live`` (``demo/live_relay.py``:
one live sequence per tab, one frame in flight, a frame-rate and size cap),
which relays them to TorchServe's inference API with the inference key from ``key_file.json``
(read at every request: TorchServe writes new keys at each start) and hands back TorchServe's
status and JSON body unchanged. The page never sees the key.

Why a relay and not CORS: TorchServe 0.12 checks the token before it looks at a request's
method, so a browser's CORS preflight (an ``OPTIONS`` request, which never carries an
``Authorization`` header) is answered 400 and the browser refuses to send the real request,
whatever ``cors_allowed_origin`` says.

Anyone who can load the page can use the inference API through it, so the server refuses any
address but loopback unless ``--allow-remote`` is given, and answers only requests whose
``Host`` (and ``Origin``, when sent) name the address it listens on (no DNS rebinding, no
posts from other sites' pages).
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import mimetypes
import sys
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

import requests

from export.archive import ALL_TASKS, STREAM_TASKS
from model_defs import LABELS
from serving import read_properties

from . import live_relay
from .palette import LABEL_COLORS, WHY_ALPHA, WHY_FLOOR

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
STATIC = Path(__file__).resolve().parent / "static"
CONFIG = REPO / "config.properties"
KEY_FILE = Path("key_file.json")  # where `make serve` runs TorchServe: the repository root
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8090
PAGES = {"/": "index.html", "/index.html": "index.html", "/app.js": "app.js", "/style.css": "style.css"}
RELAY_TIMEOUT_S = 300.0  # above TorchServe's default_response_timeout: its own timeout answers first
DEFAULT_MAX_BODY = 64 * 1024 * 1024  # when config.properties has no max_request_size


@dataclass(frozen=True)
class DemoSettings:
    """Where the demo listens, where TorchServe is, and what the page is told."""

    host: str
    port: int
    inference_url: str
    key_file: Path
    models: dict[str, str]  # task -> TorchServe model name
    labels: tuple[str, ...]
    max_body: int = DEFAULT_MAX_BODY

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def error_json(status: int, kind: str, message: str) -> bytes:
    """The service's error body shape: ``{"code", "type", "message"}``."""
    return json.dumps({"code": status, "type": kind, "message": message}).encode()


def read_key(key_file: Path) -> str:
    """The inference key from TorchServe's ``key_file.json``; LookupError says what is wrong."""
    try:
        return str(json.loads(key_file.read_text())["inference"]["key"])
    except FileNotFoundError:
        raise LookupError(f"no {key_file}: start TorchServe first (`make serve`)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LookupError(f"cannot read the inference key from {key_file}: {e}") from None


def page_config(settings: DemoSettings) -> dict[str, Any]:
    """What ``/config.json`` answers: models, labels, where TorchServe is, whether a key is there."""
    out: dict[str, Any] = {"inference_url": settings.inference_url, "models": settings.models,
                           "labels": list(settings.labels), "key_file": str(settings.key_file),
                           "colors": {label: LABEL_COLORS.get(label, "#ffffff") for label in settings.labels},
                           "why": {"floor": WHY_FLOOR, "alpha": WHY_ALPHA}}
    try:
        read_key(settings.key_file)
        out["key_found"] = True
    except LookupError as e:
        out["key_found"], out["error"] = False, str(e)
    return out


RELAYED_APIS = ("predictions", "explanations")
"""TorchServe inference APIs the page may post to: ``/<api>/<model>`` here goes to the same path there."""


def relay(settings: DemoSettings, model: str, body: bytes, content_type: str | None,
          api: str = "predictions", extra_headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """POST ``body`` to TorchServe's ``/<api>/<model>`` (``RELAYED_APIS``) with the inference key:
    (status, JSON body); TorchServe down or no key gives a 502/503 error body of our own."""
    try:
        key = read_key(settings.key_file)
    except LookupError as e:
        return 503, error_json(503, "NoInferenceKey", str(e))
    headers = {"Authorization": f"Bearer {key}", **(extra_headers or {})}
    if content_type:
        headers["Content-Type"] = content_type
    if api not in RELAYED_APIS:
        raise ValueError(f"api must be one of {', '.join(RELAYED_APIS)}, not {api!r}")
    url = f"{settings.inference_url}/{api}/{model}"
    try:
        r = requests.post(url, data=body, headers=headers, timeout=RELAY_TIMEOUT_S)
    except requests.RequestException as e:
        return 502, error_json(502, "TorchServeUnreachable",
                               f"no answer from TorchServe at {settings.inference_url} (is it running? "
                               f"`make serve`): {type(e).__name__}")
    if not r.headers.get("content-type", "").startswith("application/json"):
        return r.status_code, error_json(r.status_code, "TorchServeError", r.text[:500] or r.reason or "")
    return r.status_code, r.content


def make_handler(settings: DemoSettings) -> type[BaseHTTPRequestHandler]:
    """The request handler class: the static page, ``/config.json``, ``/ping`` and the relay."""
    csp = ("default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
           "connect-src 'self'; style-src 'self'; script-src 'self'; object-src 'none'; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    hosts = {f"{h}:{settings.port}" for h in (settings.host, "127.0.0.1", "localhost", "[::1]")}
    predict_paths = {f"/{api}/{m}": (api, m) for api in RELAYED_APIS
                     for task, m in settings.models.items() if task not in STREAM_TASKS}
    limiter = live_relay.TabLimiter()  # the live model only through /live: per tab, bounded

    class DemoHandler(BaseHTTPRequestHandler):
        server_version = "EmotionDemo"
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._get(body=True)

        def do_HEAD(self) -> None:
            self._get(body=False)

        def do_POST(self) -> None:
            if not self._trusted():
                return
            path = urlsplit(self.path).path
            if path == live_relay.LIVE_PATH and "live" in settings.models:
                self._live()
                return
            if path not in predict_paths:
                self._send(404, error_json(404, "NotFound", f"no such model here: {path}"), "application/json")
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._send(411, error_json(411, "LengthRequired", "send a Content-Length"), "application/json")
                return
            if length > settings.max_body:
                self._send(413, error_json(413, "RequestEntityTooLarge",
                                           f"upload of {length} bytes is over the {settings.max_body} byte limit"),
                           "application/json", close=True)
                return
            body = self.rfile.read(length)
            api, model = predict_paths[path]
            status, data = relay(settings, model, body, self.headers.get("Content-Type"), api)
            self._send(status, data, "application/json")

        def _live(self) -> None:
            """A webcam frame of one tab to the live model (demo/live_relay.py)."""
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._send(411, error_json(411, "LengthRequired", "send a Content-Length"), "application/json")
                return
            problem = live_relay.check(self.headers, length)
            if problem:
                self._send(problem[0], error_json(*problem), "application/json", close=True)
                return
            body = self.rfile.read(length)
            seq = self.headers[live_relay.SEQUENCE_HEADER]
            why = limiter.admit(seq)
            if why:
                self._send(429, error_json(429, "TooManyRequests", why), "application/json")
                return
            try:
                status, data = relay(settings, settings.models["live"], body, self.headers.get("Content-Type"),
                                     extra_headers=live_relay.upstream_headers(self.headers))
            finally:
                limiter.done(seq)
            self._send(status, data, "application/json")

        def _get(self, body: bool) -> None:
            if not self._trusted():
                return
            path = urlsplit(self.path).path
            if path == "/config.json":
                data, ctype = json.dumps(page_config(settings)).encode(), "application/json"
            elif path in PAGES:
                data = (STATIC / PAGES[path]).read_bytes()
                ctype = mimetypes.guess_type(PAGES[path])[0] or "application/octet-stream"
                ctype += "; charset=utf-8"
            else:
                self._send(404, error_json(404, "NotFound", f"not part of the demo: {path}"), "application/json",
                           body=body)
                return
            self._send(200, data, ctype, body=body)

        def _trusted(self) -> bool:
            """Only requests addressed to this server, from its own page (or no page at all)."""
            host, origin = self.headers.get("Host", ""), self.headers.get("Origin")
            if host not in hosts or (origin is not None and origin != f"http://{host}"):
                self._send(403, error_json(403, "Forbidden", f"host {host!r} / origin {origin!r} not allowed"),
                           "application/json", close=True)
                return False
            return True

        def _send(self, status: int, data: bytes, ctype: str, body: bool = True, close: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Security-Policy", csp)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if body:
                self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            logger.info("%s %s", self.address_string(), format % args)

    return DemoHandler


def make_server(settings: DemoSettings, allow_remote: bool = False) -> ThreadingHTTPServer:
    """Bind the demo server (loopback only unless ``allow_remote``); then ``serve_forever()``."""
    if not is_loopback(settings.host) and not allow_remote:
        raise PermissionError(
            f"refusing to listen on {settings.host}: whoever can load the page can use TorchServe's inference "
            f"API with its key, so the demo listens on loopback only; pass --allow-remote to override")
    server = ThreadingHTTPServer((settings.host, settings.port), make_handler(settings))
    server.daemon_threads = True
    return server


def served_models() -> dict[str, str]:
    """Task -> TorchServe model name, as ``export`` names the archives."""
    return {task: pkg.archive_name(task) for task, pkg in ALL_TASKS.items()}


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    """Settings from ``config.properties`` (TorchServe's address, request limit) and the command line."""
    props = read_properties(Path(args.config))
    return DemoSettings(host=args.host, port=args.port,
                        inference_url=(args.inference_url or props.get("inference_address")
                                       or "http://127.0.0.1:8080").rstrip("/"),
                        key_file=Path(args.key_file),
                        models=served_models(),
                        labels=tuple(LABELS),
                        max_body=int(props.get("max_request_size", DEFAULT_MAX_BODY)))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m demo.server", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(CONFIG), help="TorchServe's config.properties (default: %(default)s)")
    p.add_argument("--key-file", default=str(KEY_FILE), help="TorchServe's key_file.json (default: %(default)s)")
    p.add_argument("--inference-url", help="TorchServe's inference API (default: inference_address from --config)")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host (anyone who reaches it can use the inference API)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        settings = settings_from_args(args)
        server = make_server(settings, args.allow_remote)
    except (ValueError, PermissionError, OSError) as e:
        logger.error("%s", e)
        return 2
    logger.info("demo page at %s/ (TorchServe at %s, key from %s); Ctrl-C to stop",
                settings.origin, settings.inference_url, settings.key_file)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
