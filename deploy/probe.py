"""Kubernetes probe for TorchServe that works with token authorization on or off.

``python3 probe.py [--live] --management URL [--inference URL] [--key-file key_file.json] MODEL...``

Readiness (the default) exits 0 only when every named model has a READY worker, asked of the
management API (``GET /models/<name>``); liveness (``--live``) exits 0 when the frontend answers
``GET /ping`` with 200. With token authorization on, TorchServe answers both 400 without a key
(a kubelet ``httpGet`` probe cannot send one); this probe reads the keys from the
``key_file.json`` TorchServe wrote in its working folder, and sends none when the file is
absent (token authorization off). ``/ping`` is no readiness signal: it stays 200
"Healthy" with a model scaled to zero workers; the metrics port needs no key but says nothing
of the models' workers either.

Standard library only (no import of this repository): it runs with the ``python3`` of the
serving image (``deploy/Dockerfile`` copies it in) as an ``exec`` probe; the manifests pass
the addresses, and ``tests/test_manifests.py`` checks them against ``handlers/contract.py``.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

def read_keys(path: Path) -> dict[str, str]:
    """``{"management": key, "inference": key}`` from TorchServe's key file, {} without one."""
    try:
        data = json.loads(path.read_text())
        return {kind: data[kind]["key"] for kind in ("management", "inference")}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RuntimeError(f"unreadable key file {path}: {e}") from e


def get(url: str, key: str | None, timeout: float) -> tuple[int, bytes]:
    """Status and body of ``GET url`` (with ``Authorization: Bearer key`` when given)."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def model_ready(management: str, model: str, key: str | None, timeout: float) -> str | None:
    """None when ``model`` has a READY worker, else why not."""
    status, body = get(f"{management.rstrip('/')}/models/{model}", key, timeout)
    if status != 200:
        return f"{model}: management API answered {status}: {body[:200].decode(errors='replace')}"
    try:
        workers = json.loads(body)[0].get("workers") or []
    except (ValueError, IndexError, KeyError, AttributeError) as e:
        return f"{model}: unexpected description ({e})"
    if not any(w.get("status") == "READY" for w in workers):
        return f"{model}: no READY worker ({', '.join(w.get('status', '?') for w in workers) or 'none'})"
    return None


def check(models: list[str], management: str, inference: str | None = None,
          key_file: Path = Path("key_file.json"), live: bool = False, timeout: float = 3.0) -> list[str]:
    """The probe's findings: empty when it passes."""
    keys = read_keys(key_file)
    if live:
        status, body = get(f"{(inference or management).rstrip('/')}/ping", keys.get("inference"), timeout)
        return [] if status == 200 else [f"ping answered {status}: {body[:200].decode(errors='replace')}"]
    problems = [model_ready(management, m, keys.get("management"), timeout) for m in models]
    return [p for p in problems if p]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="probe.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="models that must have a READY worker (readiness)")
    p.add_argument("--live", action="store_true", help="liveness: the frontend answers /ping")
    p.add_argument("--management", required=True, help="management API, e.g. http://127.0.0.1:8081")
    p.add_argument("--inference", help="inference API for --live (default: --management)")
    p.add_argument("--key-file", type=Path, default=Path("key_file.json"),
                   help="TorchServe's key file (%(default)s, relative to the working folder)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per HTTP call")
    args = p.parse_args(argv)
    if not args.live and not args.models:
        p.error("name the models to check (or --live)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        problems = check(args.models, args.management, args.inference, args.key_file, args.live, args.timeout)
    except (OSError, RuntimeError) as e:  # refused connection, timeout, bad key file
        problems = [f"{type(e).__name__}: {e}"]
    for line in problems:
        sys.stderr.write(f"probe: {line}\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
