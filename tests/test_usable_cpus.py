"""Worker threads follow the CPUs a process may really use (affinity, a container's CPU limit)."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from handlers import common


def _cgroup(tmp_path, v2: str | None = None, v1: tuple[str, str] | None = None):
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(v1[0] + "\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(v1[1] + "\n")
    return tmp_path


@pytest.mark.parametrize("v2, v1, limit", [
    ("200000 100000", None, 2.0),        # cgroup v2, limits.cpu: 2
    ("150000 100000", None, 1.5),        # limits.cpu: 1500m
    ("max 100000", None, None),          # cgroup v2, no limit
    (None, ("50000", "100000"), 0.5),    # cgroup v1
    (None, ("-1", "100000"), None),      # cgroup v1, no limit
    (None, None, None),                  # no cgroup files at all
    ("garbage", None, None),             # unreadable: no limit rather than a crash
])
def test_cgroup_cpu_limit(tmp_path, v2, v1, limit):
    assert common.cgroup_cpu_limit(_cgroup(tmp_path, v2, v1)) == limit


def test_usable_cpus_is_capped_by_the_limit_and_the_affinity(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    (tmp_path / "a").mkdir()
    assert common.usable_cpus(_cgroup(tmp_path / "a", "200000 100000")) == 2
    (tmp_path / "b").mkdir()
    assert common.usable_cpus(_cgroup(tmp_path / "b", "150000 100000")) == 2  # 1.5 CPUs: 2 threads
    (tmp_path / "c").mkdir()
    assert common.usable_cpus(_cgroup(tmp_path / "c", "max 100000")) == 64
    (tmp_path / "d").mkdir()
    assert common.usable_cpus(_cgroup(tmp_path / "d", None, ("50000", "100000"))) == 1  # never 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)  # taskset -c 3
    assert common.usable_cpus(_cgroup(tmp_path / "c")) == 1


def test_select_device_shares_the_usable_cpus_among_workers(monkeypatch):
    monkeypatch.setattr(common, "usable_cpus", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    ctx = SimpleNamespace(system_properties={"gpu_id": None}, model_yaml_config={"maxWorkers": 2})
    assert common.select_device(ctx, {"threads": 0}) == torch.device("cpu")
    assert common.select_device(ctx, {"threads": 3}) == torch.device("cpu")
    ctx.model_yaml_config = {}
    common.select_device(ctx, {})
    assert seen == [4, 3, 8]
