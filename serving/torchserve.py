"""Start, stop and wait for a real TorchServe: one machine-wide server at a time.

TorchServe keeps its pid file and worker sockets in /tmp, so two servers cannot run at
once. :func:`running_server` takes an ``fcntl`` lock on ``/tmp/emotion-torchserve.lock``,
starts ``torchserve --start`` with the repository's ``config.properties`` (127.0.0.1 only,
token authorization on), waits until every model has a READY worker, and always stops the
server (and waits for its processes to exit) before releasing the lock::

    with running_server(model_store, ["emotion_image=emotion_image.mar"], workdir) as ts:
        requests.post(ts.predictions_url("emotion_image"), data=jpeg, headers=ts.auth("inference"))

``make serve`` / ``make stop`` use the same code from the command line (``serving.__main__``);
tests and benchmarks use :func:`running_server`.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import psutil
import requests

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config.properties"
LOCK_PATH = Path("/tmp/emotion-torchserve.lock")
PID_FILE = Path("/tmp/.model_server.pid")  # where torchserve keeps it (tempfile.gettempdir())


def read_properties(path: Path = CONFIG) -> dict[str, str]:
    """``key=value`` lines of a Java properties file (no continuation lines)."""
    props = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            props[k.strip()] = v.strip()
    return props


@contextlib.contextmanager
def machine_lock(timeout: float = 1800.0, path: Path = LOCK_PATH) -> Iterator[None]:
    """Hold the machine-wide TorchServe lock (waits up to ``timeout`` seconds for it)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another TorchServe user held {path} for over {timeout:.0f}s")
                time.sleep(1.0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def live_server_pid() -> int | None:
    """The pid of a running TorchServe frontend per its pid file, or None."""
    try:
        pid = int(PID_FILE.read_text().split()[0])
        proc = psutil.Process(pid)
        return pid if "org.pytorch.serve.ModelServer" in proc.cmdline() else None
    except (OSError, ValueError, IndexError, psutil.Error):
        return None


def _ts_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ts.model_server", *args]


def _ts_env(workdir: Path) -> dict[str, str]:
    # Same /tmp as every other TorchServe user, so the pid file and lock agree.
    return {**os.environ, "TMPDIR": "/tmp", "LOG_LOCATION": str(workdir / "logs"),
            "METRICS_LOCATION": str(workdir / "logs")}


def stop_server(pid: int | None = None, workdir: Path = Path("."), timeout: float = 60.0) -> bool:
    """``torchserve --stop``, then wait for the frontend (``pid``, default: the pid file's) and
    its workers to exit, killing what is left after ``timeout`` s; False if none was running."""
    pid = pid or live_server_pid()
    if pid is None:
        return False
    procs: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):
        parent = psutil.Process(pid)
        procs = [parent, *parent.children(recursive=True)]
    workdir = Path(workdir).resolve()
    subprocess.run(_ts_command("--stop"), cwd=workdir, env=_ts_env(workdir), stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        logger.warning("TorchServe process %d did not exit; killing it", p.pid)
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=10)
    return True


class TorchServe:
    """One TorchServe process started from ``workdir`` (logs and ``key_file.json`` go there)."""

    def __init__(self, model_store: Path, models: Sequence[str], workdir: Path,
                 config: Path = CONFIG) -> None:
        self.model_store = Path(model_store).resolve()
        self.models = list(models)
        self.workdir = Path(workdir).resolve()
        self.config = Path(config).resolve()
        props = read_properties(self.config)
        self.inference_url = props.get("inference_address", "http://127.0.0.1:8080")
        self.management_url = props.get("management_address", "http://127.0.0.1:8081")
        self.metrics_url = props.get("metrics_address", "http://127.0.0.1:8082")
        self.grpc_inference = f"{props.get('grpc_inference_address', '127.0.0.1')}:{props.get('grpc_inference_port', '7070')}"
        self.grpc_management = f"{props.get('grpc_management_address', '127.0.0.1')}:{props.get('grpc_management_port', '7071')}"
        self.token_auth = props.get("disable_token_authorization", "false").strip().lower() != "true"
        self.pid: int | None = None
        self.launched = False
        self.keys: dict[str, str] = {}

    # --- commands -------------------------------------------------------------------------
    def resolved_config(self) -> Path:
        """The config to start with: ``self.config``, or a copy in ``workdir/build/`` (never over
        the original) whose relative ``metrics_config`` path and ``vmargs``' log4j configuration
        file are made absolute (relative to the config file), because the server and its
        workers do not run from the config's folder."""
        text = self.config.read_text()
        lines, changed = [], False
        for line in text.splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "metrics_config" and value.strip() and not Path(value.strip()).is_absolute():
                line = f"metrics_config={(self.config.parent / value.strip()).resolve()}"
                changed = True
            elif key.strip() == "vmargs":
                line = re.sub(r"(-Dlog4j\.configurationFile=)(?!file:|/)(\S+)",
                              lambda m: f"{m.group(1)}file://{(self.config.parent / m.group(2)).resolve()}", line)
                changed = True
            lines.append(line)
        if not changed:
            return self.config
        path = self.workdir / "build" / "config.properties"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 180.0) -> None:
        """Start the server and wait until every model has a READY worker."""
        other = live_server_pid()
        if other is not None:
            raise RuntimeError(f"a TorchServe (pid {other}) not started by this helper is running; "
                               f"stop it first (`make stop` or `torchserve --stop`)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "key_file.json").unlink(missing_ok=True)
        cmd = _ts_command("--start", "--ncs", "--model-store", str(self.model_store),
                        "--ts-config", str(self.resolved_config()), "--models", *self.models)
        self.launched = True
        # The Java frontend inherits stdout/stderr: send them to a file, not a pipe we'd wait on.
        with open(self.workdir / "torchserve.out", "ab") as out:
            res = subprocess.run(cmd, cwd=self.workdir, env=_ts_env(self.workdir), stdout=out,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"torchserve --start failed ({res.returncode})\n{self.log_tail()}")
        deadline = time.monotonic() + timeout
        while self.pid is None:
            self.pid = live_server_pid()
            self._check_deadline(deadline, "the TorchServe process to appear")
            time.sleep(0.2)
        if self.token_auth:
            self._wait_keys(deadline)
        for name in self.model_names:
            self._wait_ready(name, deadline)
        logger.info("TorchServe pid %d ready with %s", self.pid, ", ".join(self.model_names))

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the server this object launched (never someone else's): :func:`stop_server`."""
        if not self.launched:
            return
        stop_server(self.pid, self.workdir, timeout)
        self.pid = None
        self.launched = False

    # --- state ----------------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        """Model names from ``--models`` entries (``name=file.mar`` or ``file.mar``)."""
        names = []
        for m in self.models:
            names.append(m.split("=", 1)[0] if "=" in m else Path(m).name.rsplit(".", 1)[0])
        return names

    def auth(self, kind: str = "inference") -> dict[str, str]:
        """``Authorization`` header for the ``inference`` or ``management`` API (none when the
        config switches token authorization off)."""
        return {"Authorization": f"Bearer {self.keys[kind]}"} if self.token_auth else {}

    def grpc_metadata(self, kind: str = "inference") -> tuple[tuple[str, str], ...]:
        """gRPC call metadata carrying the token."""
        return (("authorization", f"Bearer {self.keys[kind]}"),)

    def predictions_url(self, model: str) -> str:
        return f"{self.inference_url}/predictions/{model}"

    def log_tail(self, n: int = 60) -> str:
        """Last lines of the server and model logs, for error messages."""
        out = []
        for p in (self.workdir / "torchserve.out", self.workdir / "logs" / "ts_log.log",
                  self.workdir / "logs" / "model_log.log"):
            if p.is_file():
                out.append(f"--- {p} ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(out)

    def _check_deadline(self, deadline: float, what: str) -> None:
        if self.pid is not None and not psutil.pid_exists(self.pid):
            raise RuntimeError(f"TorchServe exited while waiting for {what}\n{self.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}\n{self.log_tail()}")

    def _wait_keys(self, deadline: float) -> None:
        path = self.workdir / "key_file.json"
        while True:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                data = json.loads(path.read_text())
                self.keys = {k: data[k]["key"] for k in ("management", "inference")}
                return
            self._check_deadline(deadline, f"{path}")
            time.sleep(0.2)

    def _wait_ready(self, name: str, deadline: float) -> None:
        url = f"{self.management_url}/models/{name}"
        while True:
            with contextlib.suppress(requests.RequestException, ValueError, KeyError, IndexError):
                r = requests.get(url, headers=self.auth("management"), timeout=5)
                if r.status_code == 200:
                    workers = r.json()[0]["workers"]
                    if workers and any(w.get("status") == "READY" for w in workers):
                        return
            self._check_deadline(deadline, f"model {name} to be READY")
            time.sleep(0.5)


@contextlib.contextmanager
def serving(model_store: Path, models: Sequence[str], workdir: Path, config: Path = CONFIG,
            timeout: float = 180.0) -> Iterator[TorchServe]:
    """Start TorchServe, yield it, and always stop it (the caller holds ``machine_lock``)."""
    server = TorchServe(model_store, models, workdir, config)
    try:
        server.start(timeout)
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def running_server(model_store: Path, models: Sequence[str], workdir: Path,
                   config: Path = CONFIG, timeout: float = 180.0,
                   lock_timeout: float = 1800.0) -> Iterator[TorchServe]:
    """Hold the machine lock, start TorchServe, yield it, and always stop it."""
    with machine_lock(lock_timeout), serving(model_store, models, workdir, config, timeout) as server:
        yield server
