"""The face pack (``python -m training.facepack``): real fixture faces packed into parts under a
size limit and unpacked with the same pixels, loose files carried, broken sets refused."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.facepack import PackError, decode_rows, encode_rows, split_evenly, unpack

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures"
IMAGES = ("*.jpg", "*.png")


def _images(root: Path) -> dict[str, np.ndarray]:
    """Relative path (suffix dropped) → decoded pixels, for every image below ``root``."""
    out = {}
    for pattern in IMAGES:
        for f in root.rglob(pattern):
            with Image.open(f) as img:
                out[f.relative_to(root).with_suffix("").as_posix()] = np.asarray(img)
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FER2013-shaped root: grey faces in class folders, colour crops, and a votes file."""
    root = tmp_path_factory.mktemp("src")
    shutil.copytree(FIX / "faces_regression", root / "train")
    shutil.copytree(FIX / "faces", root / "val")
    shutil.copytree(FIX / "photos", root / "photos")  # colour and grey
    (root / "votes.csv").write_text("file,neutral\ntrain/angry/x.png,3\n")
    return root


def _pack(source: Path, out: Path, part_mib: float) -> list[Path]:
    subprocess.run([sys.executable, "-m", "training.facepack", "pack", "--root", str(source), "--include",
                    "train", "val", "photos", "--files", "votes.csv", "--out", str(out), "--part-mib", str(part_mib)],
                   cwd=REPO, check=True, capture_output=True)
    return sorted(out.glob("*.tar.xz"), key=lambda p: int(p.name[4:p.name.index("of")]))


@pytest.fixture(scope="module")
def parts(source: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return _pack(source, tmp_path_factory.mktemp("pack"), part_mib=0.5)


def test_row_coding_is_exact_for_every_byte() -> None:
    rng = np.random.default_rng(0)
    for shape in [(48, 48), (7, 5, 3), (1, 1)]:
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        pixels[0, 0], pixels[0, -1] = 255, 0  # a step that wraps around
        assert np.array_equal(decode_rows(encode_rows(pixels), shape), pixels)


def test_parts_fit_the_limit_and_cover_every_image(source: Path, parts: list[Path]) -> None:
    assert len(parts) >= 2, "the limit was chosen to need several parts"
    assert all(p.stat().st_size <= 0.5 * 2 ** 20 for p in parts)
    assert [p.name for p in parts] == [f"part{i}of{len(parts)}.tar.xz" for i in range(1, len(parts) + 1)]


def test_unpack_gives_back_the_same_pixels(source: Path, parts: list[Path], tmp_path: Path) -> None:
    n = unpack(parts, tmp_path)
    before, after = _images(source), _images(tmp_path)
    assert {p.ndim for p in before.values()} == {2, 3}, "grey and colour images both travel"
    assert n == len(before) == len(after) and set(before) == set(after)
    for name, pixels in before.items():
        assert np.array_equal(after[name], pixels), name
    assert (tmp_path / "votes.csv").read_text() == (source / "votes.csv").read_text()
    assert all(f.suffix == ".png" for f in tmp_path.rglob("*") if f.is_file() and f.name != "votes.csv")


def test_a_missing_part_is_named(parts: list[Path], tmp_path: Path) -> None:
    with pytest.raises(PackError, match=rf"parts \[2\] of {len(parts)} are missing"):
        unpack([p for p in parts if not p.name.startswith("part2of")], tmp_path)


def test_a_corrupt_part_is_refused(parts: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / parts[0].name
    data = bytearray(parts[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(PackError, match="part1of"):
        unpack([bad, *parts[1:]], tmp_path / "out")
    with pytest.raises(PackError, match="no parts"):
        unpack([], tmp_path)


def test_one_part_when_the_limit_allows(source: Path, tmp_path: Path) -> None:
    assert [p.name for p in _pack(source, tmp_path, part_mib=20)] == ["part1of1.tar.xz"]


def test_split_evenly() -> None:
    assert split_evenly(10, 3) == [range(0, 3), range(3, 7), range(7, 10)]
    assert split_evenly(2, 1) == [range(0, 2)]
