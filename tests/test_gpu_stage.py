"""The accelerator stage (``tools/gpu_stage.py``), run here on the CPU with real fixture faces:
the two calls (stash, then train) exactly as the device tool makes them, every phase, and what
comes back; and what lets it run on a machine without PyAV or with the network on a GPU."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_defs import create_model, default_spec, load_checkpoint
from model_defs.inference import inference_model

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures"
STAGE = [sys.executable, str(REPO / "tools" / "gpu_stage.py")]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*STAGE, *args], cwd=REPO, check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Fixture faces packed in two parts; call 1 stashes part 1, call 2 carries part 2 and trains."""
    tmp = tmp_path_factory.mktemp("stage")
    src = tmp / "src"
    shutil.copytree(FIX / "faces_regression", src / "train")
    shutil.copytree(FIX / "faces", src / "val")
    subprocess.run([sys.executable, "-m", "training.facepack", "pack", "--root", str(src), "--include", "train",
                    "val", "--out", str(tmp / "pack"), "--part-mib", "0.06"], cwd=REPO, check=True, capture_output=True)
    parts = sorted((tmp / "pack").glob("*.tar.xz"))
    assert [p.name for p in parts] == ["part1of2.tar.xz", "part2of2.tar.xz"]
    first, second = tmp / "call1", tmp / "call2"
    first.mkdir(), second.mkdir()
    shutil.move(parts[0], first), shutil.move(parts[1], second)
    _run("stash", "--pack", str(first), "--stash", str(tmp / "kept"))
    out = tmp / "out"
    _run("train", "--pack", str(second), "--stash", str(tmp / "kept"), "--work", str(tmp / "work"), "--out", str(out),
         "--budget-s", "120", "-b", "16", "-j", "0", "--probe-faces", "32", "--max-epochs", "2")
    return {"src": src, "out": out, "tmp": tmp}


def test_both_phases_ran_and_were_scored(stage: dict[str, Path]) -> None:
    summary = json.loads((stage["out"] / "summary.json").read_text())
    assert "stopped" not in summary, summary.get("stopped")
    for phase in ("teacher", "student"):
        s = summary[phase]
        assert 1 <= s["epochs"] <= 2 and s["probe_epoch_s"] > 0
        assert [h["epoch"] for h in s["history"]] == list(range(0, s["epochs"] + 1))  # epoch 0: the start
        assert s["val"]["n"] == 14 and 0 <= s["val"]["acc"] <= s["val"]["acc_top3"] <= 1


def test_weights_come_back_calibrated(stage: dict[str, Path]) -> None:
    for name, arch in (("teacher", "emo_faceres_mnv1"), ("student", "emo_mobilenet_v2")):
        ckpt = load_checkpoint(stage["out"] / f"{name}.pth")
        assert ckpt["spec"]["arch"] == arch
        assert ckpt["spec"]["extra"]["temperature"] > 0
        assert ckpt["calibration"]["data"].endswith("val")


def test_teacher_targets_cover_the_training_faces(stage: dict[str, Path]) -> None:
    with (stage["out"] / "targets.csv").open() as f:
        rows = list(csv.DictReader(f))
    trained = {p.relative_to(stage["src"] / "train").with_suffix(".png").as_posix()
               for p in (stage["src"] / "train").rglob("*.jpg")}
    assert {r["file"] for r in rows} == trained and {r["kind"] for r in rows} == {"train"}
    for r in rows:
        assert abs(sum(float(r[c]) for c in ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")) - 1) < 1e-4


def test_a_missing_part_stops_before_training(stage: dict[str, Path]) -> None:
    tmp = stage["tmp"]
    out = tmp / "out_missing"
    _run("train", "--pack", str(tmp / "call2"), "--stash", str(tmp / "nothing"), "--work", str(tmp / "work2"),
         "--out", str(out), "--budget-s", "60")
    summary = json.loads((out / "summary.json").read_text())
    assert "parts [1] of 2 are missing" in summary["stopped"]
    assert "teacher" not in summary and not (out / "teacher.pth").exists()


def test_training_imports_without_pyav() -> None:
    code = ("import sys; sys.modules['av'] = None\n"
            "import training.run, training.distill, training.calibrate, training.evaluate, training.facepack\n"
            "from handlers.video_decode import decode_video\n"
            "try:\n    decode_video(b'x')\nexcept ImportError as e:\n    print('needs', e.name)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "needs av"


def test_views_are_made_where_the_network_is() -> None:
    spec = default_spec("emo_mobilenet_v2")
    model = create_model("emo_mobilenet_v2", spec).to("meta")
    wrapped = inference_model(model, tta_flip=True)
    assert wrapped.left.device.type == "meta" and wrapped.right.device.type == "meta"
    assert inference_model(create_model("emo_mobilenet_v2", spec), tta_flip=True).left.device == torch.device("cpu")
