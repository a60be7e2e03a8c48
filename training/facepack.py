"""Pack a folder of small face images into a few compressed parts, and unpack them exactly.

A training set has to travel where only a few tens of MiB may go: the accelerator machine of the
``device`` tool takes the working tree plus at most 64 MiB in all, and FER2013's training faces
are 62 MiB of raw pixels. The pixels are stored losslessly (row differences, then xz), split by
image into parts that each fit ``--part-mib``; unpacking writes every image back as a PNG at its
original relative path, with the same pixels, plus the loose files packed beside them.

    python -m training.facepack pack --root ../shared/data/fer2013 --include train val \\
        --files ferplus_votes.csv --out .gpu/pack --part-mib 26
    python -m training.facepack unpack .gpu/pack/*.tar.xz --out /tmp/fer2013

Each part is a ``tar.xz`` holding ``index.json`` (its images: relative path and shape; the pack's
part count; a sha256 of the raw pixels), ``pixels.bin`` and its share of the loose files.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import lzma
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

log = logging.getLogger("training.facepack")

INDEX = "index.json"
PIXELS = "pixels.bin"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FORMAT = 1
MIB = 2 ** 20


class PackError(ValueError):
    """A pack that cannot be unpacked: a missing or corrupt part."""


@dataclass(frozen=True)
class Face:
    """One packed image: its path relative to the root and its pixels (``H×W`` or ``H×W×3`` uint8)."""
    path: str
    pixels: np.ndarray


def encode_rows(pixels: np.ndarray) -> bytes:
    """Each row as its first pixel then the differences along it (mod 256): xz packs these tighter."""
    return np.diff(pixels, axis=1, prepend=np.zeros_like(pixels[:, :1])).astype(np.uint8).tobytes()


def decode_rows(data: bytes, shape: Sequence[int]) -> np.ndarray:
    """The inverse of ``encode_rows``: a running sum along each row, mod 256."""
    diff = np.frombuffer(data, np.uint8).reshape(shape)
    return np.cumsum(diff, axis=1, dtype=np.uint8)


def read_faces(root: Path, include: Sequence[str]) -> list[Face]:
    """Every image under ``root/<folder>`` for each of ``include``, sorted, as grey or RGB pixels."""
    faces = []
    for folder in include:
        files = sorted(f for f in (root / folder).rglob("*") if f.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise SystemExit(f"no images under {root / folder}")
        for f in files:
            with Image.open(f) as img:
                mode = "L" if img.mode in ("L", "1") else "RGB"
                faces.append(Face(f.relative_to(root).as_posix(), np.asarray(img.convert(mode))))
    return faces


def _payload(faces: Sequence[Face]) -> tuple[bytes, list[dict]]:
    blobs = [encode_rows(f.pixels) for f in faces]
    return b"".join(blobs), [{"path": f.path, "shape": list(f.pixels.shape)} for f in faces]


def write_part(out: Path, number: int, parts: int, faces: Sequence[Face], files: Iterable[Path],
               root: Path) -> Path:
    """One ``tar.xz`` part; returns its path."""
    pixels, index = _payload(faces)
    raw = b"".join(f.pixels.tobytes() for f in faces)
    meta = {"format": FORMAT, "part": number, "parts": parts, "images": index,
            "sha256": hashlib.sha256(raw).hexdigest(), "files": [f.relative_to(root).as_posix() for f in files]}
    path = out / f"part{number}of{parts}.tar.xz"
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w:xz", preset=9) as tar:
        for name, data in ((INDEX, json.dumps(meta).encode()), (PIXELS, pixels)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for f in files:
            tar.add(f, arcname="files/" + f.relative_to(root).as_posix())
    tmp.replace(path)
    return path


def split_evenly(n: int, parts: int) -> list[range]:
    """``parts`` consecutive ranges covering ``range(n)``, as equal as can be."""
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def pack(root: Path, include: Sequence[str], files: Sequence[Path], out: Path, part_mib: float) -> list[Path]:
    """Pack the images (and ``files``, which go in the first part) into as few parts of at most
    ``part_mib`` MiB as measure to fit: one part first, then as many as its size says, until
    every part fits. Returns the parts' paths."""
    faces = read_faces(root, include)
    out.mkdir(parents=True, exist_ok=True)
    parts = 1
    while True:
        for old in out.glob("part*.tar.xz"):
            old.unlink()
        paths = [write_part(out, i + 1, parts, [faces[j] for j in r], files if i == 0 else [], root)
                 for i, r in enumerate(split_evenly(len(faces), parts))]
        sizes = [p.stat().st_size / MIB for p in paths]
        if max(sizes) <= part_mib:
            log.info("%d images in %d parts of %s MiB", len(faces), parts, ", ".join(f"{s:.1f}" for s in sizes))
            return paths
        if parts >= len(faces):
            raise SystemExit(f"one image alone packs to more than {part_mib} MiB")
        parts = min(len(faces), max(parts + 1, int(np.ceil(parts * max(sizes) / part_mib))))


def _read_part(path: Path) -> tuple[dict, bytes, tarfile.TarFile]:
    try:
        tar = tarfile.open(path, "r:xz")
        meta = json.loads(tar.extractfile(INDEX).read())
        return meta, tar.extractfile(PIXELS).read(), tar
    except (tarfile.TarError, lzma.LZMAError, KeyError, EOFError, json.JSONDecodeError) as e:
        raise PackError(f"{path}: not a readable face-pack part ({e})") from e


def unpack_part(path: Path, out: Path) -> dict:
    """Write one part's images as PNG (and its loose files) under ``out``; returns its index."""
    meta, data, tar = _read_part(path)
    with tar:
        if meta.get("format") != FORMAT:
            raise PackError(f"{path}: pack format {meta.get('format')!r}, expected {FORMAT}")
        raw, offset = hashlib.sha256(), 0
        for item in meta["images"]:
            shape = item["shape"]
            size = int(np.prod(shape))
            pixels = decode_rows(data[offset:offset + size], shape)
            offset += size
            raw.update(pixels.tobytes())
            dest = (out / item["path"]).with_suffix(".png")
            dest.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(dest)
        if raw.hexdigest() != meta["sha256"]:
            raise PackError(f"{path}: pixels do not match their checksum")
        for name in meta["files"]:
            dest = out / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tar.extractfile("files/" + name).read())
    return meta


def unpack(paths: Sequence[Path], out: Path) -> int:
    """Unpack every part of one pack under ``out``; returns the number of images. Raises
    ``PackError`` naming the missing parts when the set is incomplete."""
    if not paths:
        raise PackError("no parts given")
    numbers, total, parts = set(), 0, 0
    for p in paths:
        meta = unpack_part(Path(p), out)
        numbers.add(meta["part"])
        parts = meta["parts"]
        total += len(meta["images"])
    missing = sorted(set(range(1, parts + 1)) - numbers)
    if missing:
        raise PackError(f"parts {missing} of {parts} are missing")
    return total


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="pack image folders into parts")
    a.add_argument("--root", required=True, help="the folder the packed paths are relative to")
    a.add_argument("--include", nargs="+", required=True, help="folders under ROOT to pack (e.g. train val)")
    a.add_argument("--files", nargs="*", default=[], help="loose files under ROOT to take along (e.g. the votes)")
    a.add_argument("--out", required=True)
    a.add_argument("--part-mib", type=float, default=26.0, help="largest part, in MiB")
    b = sub.add_parser("unpack", help="unpack parts into a folder")
    b.add_argument("parts", nargs="+")
    b.add_argument("--out", required=True)
    return p


def main(args: argparse.Namespace) -> list[str] | int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd == "pack":
        root = Path(args.root)
        paths = pack(root, args.include, [root / f for f in args.files], Path(args.out), args.part_mib)
        return [str(p) for p in paths]
    n = unpack([Path(p) for p in args.parts], Path(args.out))
    log.info("unpacked %d images into %s", n, args.out)
    return n


if __name__ == "__main__":
    main(get_args_parser().parse_args())
