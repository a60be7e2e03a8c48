"""The DDP path, run for real on the CPU (gloo): ``torchrun --nproc-per-node 2`` on one machine,
and ``torchrun --nnodes 2 --nproc-per-node 1`` as two "nodes" (two launchers on this machine
meeting at a c10d rendezvous on 127.0.0.1)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from model_defs import load_checkpoint
from tests.tsserver import free_port

REPO = Path(__file__).resolve().parent.parent
FACES = Path(__file__).parent / "fixtures" / "faces"
TRAIN_ARGS = ["-m", "training.run", "--task", "image", "--model", "emo_resnet_s", "--epochs", "1", "-b", "2",
              "-j", "0", "--threads", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def tiny_data(tmp_path: Path) -> tuple[Path, int]:
    """The face fixtures as train/ and val/ folders, and the number of training images."""
    data = tmp_path / "data"
    shutil.copytree(FACES, data / "train")
    shutil.copytree(FACES, data / "val")
    return data, sum(1 for f in (data / "train").rglob("*") if f.is_file())


def check_run(log: str, out: Path, n_images: int, world: int = 2) -> None:
    """Every rank trained one epoch on its own disjoint shard; rank 0 alone wrote one checkpoint."""
    shards = {int(m[1]): json.loads(m[3]) for m in
              re.finditer(r"rank (\d)/(\d): epoch 1 shard of \d+ training items: (\[.*?\])", log)}
    assert sorted(shards) == list(range(world)), log[-3000:]
    for a in range(world):
        for b in range(a + 1, world):
            assert set(shards[a]).isdisjoint(shards[b])  # each rank trained on its own part
    assert all(len(s) == n_images // world for s in shards.values())
    assert sorted(p.name for p in out.glob("*.pth")) == ["best.pth", "checkpoint.pth"]  # written once, by rank 0
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["epoch"] == 1 and ckpt["spec"]["arch"] == "emo_resnet_s"
    assert "epoch 1/1" in log


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_train_disjoint_shards(tmp_path):
    data, n_images = tiny_data(tmp_path)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *TRAIN_ARGS, "--data", str(data), "--output-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    check_run(log, out, n_images)


@pytest.mark.slow
def test_torchrun_two_nodes_meet_at_a_c10d_rendezvous(tmp_path):
    """Two launchers, as two machines would start them (the same command on each node; on a
    cluster the endpoint is one node's address and --local-addr each node's own)."""
    data, n_images = tiny_data(tmp_path)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "emotion-test",
           "--local-addr", "127.0.0.1", *TRAIN_ARGS, "--data", str(data), "--output-dir", str(out)]
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    nodes = []
    for log in logs:
        with open(log, "w") as f:
            nodes.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, cwd=REPO))
    try:
        codes = [node.wait(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    text = "\n".join(log.read_text() for log in logs)
    assert codes == [0, 0], text[-4000:]
    check_run(text, out, n_images)
    # one rank per node: each launcher ran one worker (group rank 0 and 1 of 2)
    assert sorted(int(m[1]) for m in re.finditer(r"rank (\d)/2: epoch 1 shard", text)) == [0, 1]
    assert all(len(re.findall(r"rank \d/2: epoch 1 shard", log.read_text())) == 1 for log in logs)
