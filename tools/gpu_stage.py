"""Issue 20's teacher-and-student stage on an accelerator machine, in two calls of the ``device`` tool.

The working tree travels with at most 64 MiB in all, so FER2013 goes as a lossless face pack in
two parts (``python -m training.facepack``, about 26 MiB each): the first call leaves part 1 on
the machine, the second brings part 2 and trains. Everything here runs the project's own commands
(``training.run`` under torchrun with mixed precision, ``training.distill``, ``training.calibrate``,
``training.evaluate``); only the number of epochs is chosen here, from a one-epoch probe on 12,800
faces, so that each phase fits its share of the time left.

Here, once (CPU, 3 minutes): ``make gpu-pack``. Then with the device tool, back to back (the
machine is given back 30 s after a call):

    run(command="python3 tools/gpu_stage.py stash", carry=[".gpu/pack/part1of2.tar.xz"], timeout_s=120)
    run(command="python3 tools/gpu_stage.py train --out $OUT", carry=[".gpu/pack/part2of2.tar.xz"], timeout_s=600)

What comes back under ``$OUT``: ``teacher.pth`` and ``student.pth`` (calibrated on val),
``targets.csv`` (the teacher's answers on the training faces, for ``training.run --distill`` on a
CPU), ``summary.json`` (every figure, the epochs and seconds of each phase) and ``stage.log``.
Phases that the time left cannot hold are skipped, and say so in the summary; what finished is
kept. On a machine without a GPU it runs the same way on the CPU (the smoke test does that).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from training import calibrate, distill, evaluate, facepack  # noqa: E402

log = logging.getLogger("gpu_stage")

STASH = Path("/tmp/facepack")
PACK = ROOT / ".gpu" / "pack"
PROBE_FACES = 12800
"""About half an epoch: the probe's evaluation of val, a fixed cost per epoch, is scaled up with its
training time, so a short probe would overestimate an epoch and leave the budget unused."""
VOTES = "ferplus_votes.csv"

TEACHER = ["--model", "emo_faceres_mnv1", "--init", "pretrain/teacher_faceres.pth", "--opt", "sgd",
           "--lr", "0.02", "--head-lr-scale", "3", "--wd", "1e-4", "--warmup-epochs", "1", "--ema-epochs", "2"]
"""The face-recognition teacher at 112 px, a warm restart of its committed stage 2 (lr for batch 256)."""
STUDENT = ["--model", "emo_mobilenet_v2", "--init", "pretrain/emotion_image.pth", "--lr", "0.012",
           "--wd", "1e-4", "--warmup-epochs", "1", "--ema-epochs", "1.5"]
"""The shipped network, a warm restart of the shipped weights with the teacher's answers mixed in."""
COMMON = ["--task", "image", "--label-weight", "0.5", "--label-smoothing", "0", "--class-balance", "none",
          "--cache"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cmd", choices=["stash", "train"], help="stash: keep the carried parts for the next call; "
                   "train: unpack every part, then teacher, targets, student")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_stage"), help="what comes back")
    p.add_argument("--pack", default=str(PACK), help="the carried parts")
    p.add_argument("--stash", default=str(STASH), help="where 'stash' keeps them for the next call")
    p.add_argument("--data", help="an unpacked dataset root instead of the packs (train/, val/, votes)")
    p.add_argument("--work", default="/tmp/gpu_stage", help="scratch: the unpacked faces and the runs")
    p.add_argument("--budget-s", type=float, default=540, help="seconds for the whole train command")
    p.add_argument("--teacher-share", type=float, default=0.45, help="share of the time left for the teacher")
    p.add_argument("--student-share", type=float, default=0.75,
                   help="share of the time left after the teacher for the student")
    p.add_argument("-b", "--batch-size", type=int, default=256)
    p.add_argument("-j", "--workers", type=int, default=8)
    p.add_argument("--max-epochs", type=int, default=200)
    p.add_argument("--subset", type=int, default=0, help="train on N faces only (smoke runs)")
    p.add_argument("--probe-faces", type=int, default=PROBE_FACES)
    return p


def stash(pack: Path, keep: Path) -> list[str]:
    """Copy the carried parts out of the working tree, where the next call finds them."""
    keep.mkdir(parents=True, exist_ok=True)
    for p in sorted(pack.glob("*.tar.xz")):
        shutil.copy2(p, keep / p.name)
    return sorted(p.name for p in keep.glob("*.tar.xz"))


def unpack_data(pack: Path, keep: Path, work: Path) -> Path:
    """The dataset root, unpacked from the carried and stashed parts (once)."""
    root, done = work / "fer2013", work / "fer2013.done"
    if not done.exists():
        parts = {p.name: p for d in (keep, pack) for p in sorted(d.glob("*.tar.xz"))}
        n = facepack.unpack(list(parts.values()), root)
        done.write_text(str(n))
    return root


def train_command(args: argparse.Namespace, recipe: list[str], data: Path, out_dir: Path, epochs: int,
                  extra: list[str]) -> list[str]:
    """``training.run`` under torchrun (one process per GPU; one on a CPU)."""
    gpus = torch.cuda.device_count()
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"]
                if gpus else [sys.executable])
    votes = ["--soft-labels", str(data / VOTES)] if (data / VOTES).exists() else []
    subset = ["--subset", str(args.subset)] if args.subset else []
    return [*launcher, "-m", "training.run", *COMMON, *recipe, *votes, *subset, *extra, "--data", str(data),
            "--epochs", str(epochs), "-b", str(args.batch_size), "-j", str(args.workers),
            "--output-dir", str(out_dir)]


def run_logged(cmd: list[str], logfile: Path) -> None:
    log.info("$ %s", " ".join(cmd))
    with logfile.open("a") as f:
        subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)


def probe_epoch_s(args: argparse.Namespace, recipe: list[str], data: Path, extra: list[str], logfile: Path) -> float:
    """Seconds one epoch over the whole training set takes, from one epoch on a subset."""
    n_train = sum(1 for f in (data / "train").rglob("*") if f.suffix.lower() in facepack.IMAGE_EXTS)
    faces = min(args.probe_faces, args.subset or n_train, n_train)
    out_dir = Path(args.work) / f"probe_{recipe[1]}"
    probe = argparse.Namespace(**{**vars(args), "subset": faces})
    run_logged(train_command(probe, recipe, data, out_dir, 1, [a for a in extra if a != "--eval-initial"]), logfile)
    seconds = torch.load(out_dir / "checkpoint.pth", map_location="cpu", weights_only=True)["history"][-1]["seconds"]
    return seconds * min(args.subset or n_train, n_train) / faces


def scored(weights: Path, data: Path) -> dict:
    """Val against the folder labels and against the FER+ majority, as served."""
    labels = {"val": []}
    if (data / VOTES).exists():
        labels["val_ferplus"] = ["--ferplus", str(data / VOTES)]
    parser, common = evaluate.get_args_parser(), ["--data", str(data / "val"), "--weights", str(weights)]
    return {name: _figures(evaluate.main(parser.parse_args(common + extra))) for name, extra in labels.items()}


def _figures(res: dict) -> dict:
    return {k: res[k] for k in ("acc", "acc_top3", "n", "ece", "per_class")}


def train_phase(args: argparse.Namespace, name: str, recipe: list[str], data: Path, seconds: float,
                extra: list[str], logfile: Path) -> dict:
    """Probe, train for as many epochs as ``seconds`` holds, calibrate on val into OUT/<name>.pth."""
    t0 = time.time()
    epoch_s = probe_epoch_s(args, recipe, data, extra, logfile)
    epochs = int(max(1, min(args.max_epochs, (seconds - (time.time() - t0)) / epoch_s)))
    out_dir = Path(args.work) / name
    run_logged(train_command(args, recipe, data, out_dir, epochs, extra), logfile)
    final = Path(args.out) / f"{name}.pth"
    cal = calibrate.get_args_parser().parse_args(
        ["--weights", str(out_dir / "best.pth"), "--data", str(data / "val"), "--out", str(final), "--tta-flip", "off"])
    calibrate.main(cal)
    history = torch.load(out_dir / "checkpoint.pth", map_location="cpu", weights_only=True)["history"]
    return {"epochs": epochs, "probe_epoch_s": round(epoch_s, 1), "seconds": round(time.time() - t0),
            "history": history, **scored(final, data)}


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd == "stash":
        names = stash(Path(args.pack), Path(args.stash))
        log.info("stashed in %s: %s", args.stash, names)
        return {"stashed": names}
    start, out, work = time.time(), Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    logfile = out / "stage.log"
    summary: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                     "torch": torch.__version__, "budget_s": args.budget_s}

    def left() -> float:
        return args.budget_s - (time.time() - start)

    try:
        data = Path(args.data) if args.data else unpack_data(Path(args.pack), Path(args.stash), work)
        summary["unpacked_s"] = round(time.time() - start)
        summary["teacher"] = train_phase(args, "teacher", TEACHER, data, left() * args.teacher_share,
                                         ["--eval-initial"], logfile)
        targets = work / "distill"
        distill.main(distill.get_args_parser().parse_args(
            ["--teachers", str(out / "teacher.pth"), "--train-dir", str(data / "train"), "--out", str(targets)]))
        shutil.copy2(targets / distill.TARGETS_CSV, out / distill.TARGETS_CSV)
        summary["student"] = train_phase(args, "student", STUDENT, data, left() * args.student_share,
                                         ["--eval-initial", "--distill", str(targets)], logfile)
    except (subprocess.CalledProcessError, facepack.PackError, FileNotFoundError) as e:
        summary["stopped"] = f"{type(e).__name__}: {e}"
        log.error("stopped: %s (the log: %s)", e, logfile)
    summary["total_s"] = round(time.time() - start)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("teacher", "student")}))
    return summary


if __name__ == "__main__":
    main(get_args_parser().parse_args())
