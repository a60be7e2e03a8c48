"""deploy/k8s/'s authenticating proxy (nginx) run on this machine, for the end-to-end tests."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator, Mapping

import yaml

from tests.tsserver import free_port, wait_for_http

REPO = Path(__file__).resolve().parents[1]
PROXY_CONFIG = REPO / "deploy" / "k8s" / "proxy-config.yaml"
NGINX = shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))


def proxy_template() -> str:
    """The ``default.conf.template`` of the proxy's ConfigMap."""
    return yaml.safe_load(PROXY_CONFIG.read_text())["data"]["default.conf.template"]


def render(template: str, env: Mapping[str, str]) -> str:
    """What the nginx image's entrypoint does with a template: ``${NAME}`` of the given
    environment replaced, every other ``$`` (nginx's own variables) left alone."""
    for name, value in env.items():
        template = template.replace("${" + name + "}", value)
    return template


@contextlib.contextmanager
def nginx_proxy(template: str, env: Mapping[str, str], tmp: Path) -> Iterator[str]:
    """nginx with the rendered server block on a free port (instead of the pod's), its URL."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = render(template, env)
    listen = next(line for line in server.splitlines() if line.strip().startswith("listen "))
    (tmp / "default.conf").write_text(server.replace(listen, f"    listen 127.0.0.1:{port};"))
    temp = "\n".join(f"    {k}_temp_path {tmp}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (tmp / "nginx.conf").write_text(
        f"{'user root;' if os.geteuid() == 0 else ''}\ndaemon off;\nworker_processes 1;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;\n"
        f"events {{}}\nhttp {{\n    access_log off;\n{temp}\n    include {tmp}/default.conf;\n}}\n")
    proc = subprocess.Popen([NGINX, "-c", str(tmp / "nginx.conf"), "-p", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/healthz", proc, tmp / "error.log", timeout=20)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
