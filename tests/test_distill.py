"""Distillation: teacher targets from ``python -m training.distill`` on real fixture faces, photos
and videos, and ``training.run --distill`` training on them."""
from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from handlers.preprocess import decode_image
from model_defs import LABELS, SHIPPED_WEIGHTS, load_checkpoint, load_model
from training.datasets import ImageFolderDataset
from training.distill import (FACES_DIR, TARGETS_CSV, mix_teacher_targets, read_targets, teacher_probs,
                              with_unlabelled)

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures"
TEACHER = REPO / "pretrain" / "teacher_faceres.pth"
STUDENT = REPO / SHIPPED_WEIGHTS["image"]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root (train = val = the fixture faces) and the CLI's targets for it, two teachers."""
    root = tmp_path_factory.mktemp("distill")
    shutil.copytree(FIX / "faces", root / "data" / "train")
    shutil.copytree(FIX / "faces", root / "data" / "val")
    subprocess.run([sys.executable, "-m", "training.distill", "--teachers", str(TEACHER), str(STUDENT),
                    "--train-dir", str(root / "data" / "train"), "--photos", str(FIX / "photos"),
                    "--videos", str(FIX / "video"), "--min-face", "24", "--out", str(root / "out"), "--threads", "1"],
                   cwd=REPO, check=True, capture_output=True)
    return root


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / TARGETS_CSV).open(newline="") as f:
        return list(csv.DictReader(f))


def test_targets_cover_every_training_image_and_the_faces_found(distilled: Path):
    rows = _rows(distilled / "out")
    train = {r["file"] for r in rows if r["kind"] == "train"}
    want = {p.relative_to(distilled / "data" / "train").as_posix()
            for p in (distilled / "data" / "train").rglob("*.jpg")}
    assert train == want
    faces = [r["file"] for r in rows if r["kind"] == "unlabelled"]
    assert sorted(faces) == sorted(f"{FACES_DIR}/{p.name}" for p in (distilled / "out" / FACES_DIR).iterdir())
    assert len([f for f in faces if f.startswith(f"{FACES_DIR}/photo_group_")]) >= 3  # every face of a group
    assert not any("no_face" in f for f in faces)  # a photo without a face adds nothing
    assert any(f.startswith(f"{FACES_DIR}/video_mead_happy") for f in faces)
    for f in faces:  # aligned crops at the largest teacher's input, grey like both teachers
        img = Image.open(distilled / "out" / f)
        assert img.size == (112, 112) and img.mode == "L"
    for r in rows:
        assert sum(float(r[c]) for c in LABELS) == pytest.approx(1.0, abs=1e-4)


def test_ensemble_is_the_mean_of_its_teachers_and_knows_the_faces():
    files = sorted((FIX / "faces").rglob("*.jpg"))
    images = [decode_image(f.read_bytes()) for f in files]
    teacher, student = load_model(TEACHER), load_model(STUDENT)
    pt, ps = teacher_probs([teacher], images), teacher_probs([student], images)
    torch.testing.assert_close(teacher_probs([teacher, student], images), (pt + ps) / 2)
    labels = torch.tensor([LABELS.index(f.parent.name) for f in files])
    for p in (pt, ps):  # real answers, not noise: most fixture faces are read right
        assert (p.argmax(1) == labels).float().mean() >= 0.5


def test_teacher_targets_mix_into_labels_and_unlabelled_faces_join(distilled: Path):
    train_dir = distilled / "data" / "train"
    spec = load_model(STUDENT).spec.to_dict()
    ds = ImageFolderDataset(train_dir, spec)
    teacher, faces = read_targets(distilled / "out")
    first = Path(ds.files[0]).relative_to(train_dir).as_posix()
    partial = {k: v for k, v in teacher.items() if k != first}
    assert mix_teacher_targets(ds, partial, 0.25) == len(ds) - 1
    one_hot = torch.nn.functional.one_hot(torch.tensor(ds.labels), len(LABELS)).float()
    torch.testing.assert_close(ds.targets[0], one_hot[0])  # no teacher answer: its own label
    k = Path(ds.files[1]).relative_to(train_dir).as_posix()
    torch.testing.assert_close(ds.targets[1], 0.75 * one_hot[1] + 0.25 * teacher[k])
    both = with_unlabelled(ds, faces, spec)
    assert len(both) == len(ds) + len(faces) and len(faces) > 0
    x, y = both[len(ds)]
    assert x.shape == (1, 64, 64) and x.dtype == torch.uint8
    torch.testing.assert_close(y, faces[0][1])


def test_read_targets_names_a_bad_file(tmp_path: Path):
    (tmp_path / TARGETS_CSV).write_text("kind,file,angry\ntrain,a.png,1\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_targets(tmp_path)
    (tmp_path / TARGETS_CSV).write_text("kind,file," + ",".join(LABELS) + "\nval,a.png" + ",0" * 7 + "\n")
    with pytest.raises(ValueError, match="unknown kind 'val'"):
        read_targets(tmp_path)


def test_train_cli_with_distill_trains_on_labelled_and_unlabelled_faces(distilled: Path, tmp_path: Path):
    n_faces = len(read_targets(distilled / "out")[1])
    r = subprocess.run([sys.executable, "-m", "training.run", "--task", "image", "--data", str(distilled / "data"),
                        "--distill", str(distilled / "out"), "--distill-weight", "0.7", "--epochs", "1", "-b", "7",
                        "--workers", "0", "--cache", "--threads", "1", "--output-dir", str(tmp_path / "run")],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    n_train = len(list((distilled / "data" / "train").rglob("*.jpg")))
    assert f"training emo_mobilenet_v2 on {n_train + n_faces} images" in r.stderr
    assert load_checkpoint(tmp_path / "run" / "best.pth")["train_args"]["distill_weight"] == 0.7
