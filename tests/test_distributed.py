"""The DDP path, run for real: ``torchrun --nproc-per-node 2`` on the CPU (gloo)."""
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

FACES = Path(__file__).parent / "fixtures" / "faces"


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_train_disjoint_shards(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(FACES, data / "train")
    shutil.copytree(FACES, data / "val")
    n_images = sum(1 for f in (data / "train").rglob("*") if f.is_file())
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "training.run", "--task", "image", "--model", "emo_resnet_s", "--data", str(data),
           "--epochs", "1", "-b", "2", "-j", "0", "--threads", "1", "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).resolve().parent.parent)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]

    shards = {int(m[1]): json.loads(m[3]) for m in re.finditer(r"rank (\d)/(\d): epoch 1 shard of \d+ training items: (\[.*?\])", log)}
    assert sorted(shards) == [0, 1], log[-3000:]
    assert set(shards[0]).isdisjoint(shards[1])  # each rank trained on its own half
    assert len(shards[0]) == len(shards[1]) == n_images // 2

    assert sorted(p.name for p in out.glob("*.pth")) == ["best.pth", "checkpoint.pth"]  # written once, by rank 0
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["epoch"] == 1 and ckpt["spec"]["arch"] == "emo_resnet_s"
    assert "epoch 1/1" in log
