"""Safe defaults: loopback listeners, tokens, no model registration, local archives only, stated
limits, weights-only checkpoints, and ``make serve`` cleaning up after a failed start."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import psutil
import pytest
import requests
import torch

from export.__main__ import main as export_main
from model_defs import CheckpointError, create_model, load_checkpoint, load_model, save_weights
from serving import live_server_pid, machine_lock, read_properties, running_server
from serving.grpc_client import predict as grpc_predict

REPO = Path(__file__).resolve().parents[1]
PROPS = read_properties()
FACE = next((Path(__file__).parent / "fixtures" / "faces").glob("*/*.jpg"))
SKIP_DIRS = {".venv", "build", "runs", "model_store", ".git", "node_modules"}


# ---------------------------------------------------------------- config.properties


def test_every_listener_is_on_loopback():
    for key in ("inference_address", "management_address", "metrics_address"):
        assert re.fullmatch(r"https?://127\.0\.0\.1:\d+", PROPS[key]), (key, PROPS[key])
    for key in ("grpc_inference_address", "grpc_management_address"):
        assert PROPS[key] == "127.0.0.1", (key, PROPS[key])


def test_token_auth_on_registration_off_local_archives_only_limits_stated():
    assert PROPS.get("disable_token_authorization", "false").lower() != "true"
    assert PROPS["enable_model_api"] == "false"
    allowed = PROPS["allowed_urls"].replace("\\\\", "\\")
    assert re.fullmatch(allowed, "file:///srv/emotion/model_store/emotion_image.mar")
    for url in ("https://example.com/model_store/x.mar", "http://127.0.0.1/model_store/x.mar",
                "file:///etc/passwd", "file:///tmp/other/x.mar", "s3://bucket/model_store/x.mar"):
        assert not re.fullmatch(allowed, url), url
    assert int(PROPS["max_request_size"]) > 0 and int(PROPS["max_response_size"]) > 0
    assert int(PROPS["max_request_size"]) <= 128 * 2**20


# ---------------------------------------------------------------- checkpoints


def torch_load_calls(path: Path) -> list[tuple[int, bool]]:
    """``(line, weights_only=True?)`` for every ``torch.load(...)`` call in a Python file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            out.append((node.lineno, safe))
    return out


def python_files() -> list[Path]:
    files = []
    for dirpath, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")]
        files += [Path(dirpath) / n for n in names if n.endswith(".py")]
    return files


def test_every_torch_load_is_weights_only():
    calls = {p.relative_to(REPO): torch_load_calls(p) for p in python_files()}
    unsafe = [f"{p}:{line}" for p, cs in calls.items() for line, safe in cs if not safe]
    assert sum(len(c) for c in calls.values()) >= 1  # the check sees the real loader
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"
    # nothing loads pickles another way either
    pattern = re.compile(r"\bpickle\.loads?\(|torch\.serialization\.load\(|from torch import load\b")
    sneaky = [str(p.relative_to(REPO)) for p in python_files()
              if p.name != Path(__file__).name and pattern.search(p.read_text())]
    assert not sneaky, sneaky


class Payload:
    """An arbitrary object: unpickling it would run code if the loader allowed it."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    model = create_model("emo_resnet_s")
    path = tmp_path / "evil.pth"
    torch.save({"format": 1, "spec": model.spec.to_dict(), "state_dict": model.state_dict(),
                "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused to load.*pickled Python objects"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError):
        load_model(path)


def test_corrupt_checkpoint_is_refused_cleanly(tmp_path):
    path = tmp_path / "ok.pth"
    save_weights(create_model("emo_resnet_s"), path)
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "cut.pth")


# ---------------------------------------------------------------- make serve
# These run BEFORE the module's server fixture starts (file order): they take the machine lock
# themselves and need no TorchServe running.


def serve_tree(tmp: Path) -> Path:
    """A working folder for ``make serve``: the repository's Makefile and config, its venv and
    handler code linked in, so the server's logs and key file stay out of the repository."""
    work = tmp / "work"
    work.mkdir()
    for name in ("Makefile", "config.properties", "metrics.yaml", "pyproject.toml", ".venv", "handlers",
                 "export", "serving", "pretrain"):
        if (REPO / name).exists():
            (work / name).symlink_to(REPO / name)
    return work


def make_serve(work: Path, store: Path, mar: Path) -> subprocess.CompletedProcess:
    """``make serve`` on one archive, without rebuilding it (``-o``) or reinstalling."""
    cmd = ["make", "--no-print-directory", "serve", f"MODEL_STORE={store}", f"ARCHIVES={mar}",
           "SERVE_TIMEOUT=25", "-o", str(mar), "-o", ".venv/.installed"]
    return subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)


def ts_processes() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "org.pytorch.serve.ModelServer" in cmd or "ts/model_service_worker.py" in cmd:
            out.append(p)
    return out


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None or shutil.which("curl") is None, reason="needs make and curl")
@pytest.mark.parametrize("damage", ["garbage_archive", "corrupt_weights"])
def test_make_serve_failure_leaves_no_server(tmp_path, damage):
    store = tmp_path / "store"
    store.mkdir()
    mar = store / "emotion_image.mar"
    if damage == "garbage_archive":
        mar.write_bytes(b"this is not a zip archive\n" * 100)
    else:  # a well-formed archive whose TorchScript file is corrupt
        save_weights(create_model("emo_resnet_s"), tmp_path / "w.pth")
        assert export_main(["--task", "image", "--checkpoint", str(tmp_path / "w.pth"), "--out", str(store)]) == 0
        good = zipfile.ZipFile(mar)
        items = {i.filename: good.read(i) for i in good.infolist()}
        good.close()
        items["model.pt"] = items["model.pt"][: len(items["model.pt"]) // 2]
        with zipfile.ZipFile(mar, "w") as z:
            for name, data in items.items():
                z.writestr(name, data)
    work = serve_tree(tmp_path)
    with machine_lock():
        assert live_server_pid() is None and not ts_processes(), "a TorchServe is already running"
        res = make_serve(work, store, mar)
        leftover = ts_processes()
        for p in leftover:  # clean up before asserting, so a failure here leaves nothing behind
            p.kill()
        psutil.wait_procs(leftover, timeout=10)
    print(f"\nmake serve with {damage}: exit {res.returncode}; stderr tail: {res.stderr.strip().splitlines()[-1:]}")
    assert res.returncode != 0, res.stdout[-2000:]
    assert "not READY" in res.stderr or "ERROR" in res.stderr, res.stderr[-2000:]
    assert not leftover, [p.pid for p in leftover]
    assert live_server_pid() is None


# ---------------------------------------------------------------- a running server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("safe")
    torch.manual_seed(0)
    save_weights(create_model("emo_resnet_s"), tmp / "w.pth")
    assert export_main(["--task", "image", "--checkpoint", str(tmp / "w.pth"), "--out", str(tmp / "store")]) == 0
    with running_server(tmp / "store", ["emotion_image=emotion_image.mar"], tmp / "server") as ts:
        yield ts


@pytest.mark.e2e
@pytest.mark.slow
def test_server_listens_on_loopback_only(server):
    procs = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    listening = [c.laddr for p in procs for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert len(listening) >= 5, listening  # inference, management, metrics, gRPC x2
    # Java reports IPv4 sockets as IPv4-mapped IPv6 addresses
    assert all(a.ip in ("127.0.0.1", "::ffff:127.0.0.1") for a in listening), listening


@pytest.mark.e2e
@pytest.mark.slow
def test_requests_without_the_key_are_refused(server):
    import grpc  # noqa: F401  (the gRPC calls below need it installed)

    body = FACE.read_bytes()
    for url, method in ((server.predictions_url("emotion_image"), "post"), (f"{server.management_url}/models", "get"),
                        (f"{server.management_url}/models/emotion_image", "get")):
        for headers in ({}, {"Authorization": "Bearer wrong-key"}):
            r = requests.request(method, url, data=body if method == "post" else None, headers=headers, timeout=30)
            assert r.status_code in (400, 401, 403), (url, headers, r.status_code)
    # the inference key does not open the management API
    r = requests.get(f"{server.management_url}/models", headers=server.auth("inference"), timeout=30)
    assert r.status_code in (400, 401, 403)
    with pytest.raises(grpc.RpcError) as e:
        grpc_predict(server.grpc_inference, "emotion_image", body, "wrong-key")
    assert e.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
    assert requests.post(server.predictions_url("emotion_image"), data=body, headers=server.auth(),
                         timeout=30).status_code == 200


@pytest.mark.e2e
@pytest.mark.slow
def test_model_registration_api_is_off(server):
    store = server.model_store
    for params in ({"url": "emotion_image.mar", "model_name": "again"},
                   {"url": f"file://{store}/emotion_image.mar", "model_name": "again"},
                   {"url": "https://example.com/evil.mar"}):
        r = requests.post(f"{server.management_url}/models", params=params, headers=server.auth("management"),
                          timeout=30)
        assert 400 <= r.status_code < 500, (params, r.status_code, r.text)
    r = requests.delete(f"{server.management_url}/models/emotion_image", headers=server.auth("management"), timeout=30)
    assert 400 <= r.status_code < 500
