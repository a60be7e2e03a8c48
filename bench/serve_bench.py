"""Served throughput and latency of the emotion service against the in-process limit and against
TorchServe's stock ``image_classifier`` handler, all measured in one run.

    .venv/bin/python -m bench.serve_bench            # full suite (make bench), < 10 minutes
    .venv/bin/python -m bench.serve_bench --quick    # smoke run (make bench-quick)

Figures:

1. limit: in-process throughput of the exported TorchScript image model at its best batch size
   (crops already decoded; plain and ``optimize_for_inference`` graphs, the faster counts) and
   batch-1 latency; measured before and after the served runs, the higher is used.
2. served: REST ``emotion_image`` at concurrency 1, 8, 32 with real JPEG face crops
   (tests/fixtures/faces), with real photos (detection on), and gRPC at concurrency 8.
3. stock: TorchServe's ``image_classifier`` handler serving the same TorchScript model, wrapped
   so that it takes the stock handler's tensor (N, 3, 224, 224, ImageNet-normalized) and turns it
   into the model's input (grayscale, resize to 48, the model's normalization) inside TorchScript;
   same index_to_name.json, batch size and delay; same crops, same load. It runs twice: with
   our worker count, and with one worker (the stock handler leaves PyTorch's default threads,
   all cores, per worker, so several workers oversubscribe the CPU); the better one counts.
4. video: ``emotion_video`` clips/s and p50/p99 latency at concurrency 1 and 4 for a 4-second
   256x256 clip (one face) and, when ``../shared/data`` is there, a 4-second 1080p clip with five
   faces (``facenet_pytorch_video.mp4``), and the share of the 256x256 latency spent in the
   model's forward pass.

The face crops are sent re-encoded as 3-channel JPEGs to both servers: the stock handler cannot
read the 1-channel FER2013 JPEGs (its ImageNet ``Normalize`` needs 3 channels; checked and
reported as ``stock_accepts_grayscale_jpeg``).

Each REST row also reports the CPU time per answered request of the TorchServe frontend, its
workers and the load client (psutil), which shows where the served path spends the cores.

Prints a markdown table, then, as the very last line, one JSON object with every figure
(``image_vs_inprocess`` = served crops/s at concurrency 32 / limit; ``image_vs_stock_handler`` =
our crops/s / the stock handler's best variant, concurrency 32). Results go to bench/results/ as JSON and PNG.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from bench.bench_model import time_batches
from bench.bench_video import cut
from bench.loadgen import GrpcClient, LoadResult, RestClient, run_load
from export.archive import build_archive, model_config_for, run_archiver
from export.torchscript import export_torchscript
from handlers.common import load_scripted
from handlers.contract import IMAGE_DEFAULTS, VIDEO_DEFAULTS
from model_defs import create_model, load_model, save_weights
from serving import machine_lock, serving

REPO = Path(__file__).resolve().parents[1]

log = logging.getLogger("serve_bench")

FIXTURES = REPO / "tests" / "fixtures"
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "bench" / "results"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STOCK_NAME = "stock_image"
CLIP_SECONDS = 4.0


# --- the stock alternative --------------------------------------------------------------------
class StockInputAdapter(nn.Module):
    """The stock handler's (N, 3, 224, 224) ImageNet-normalized tensor → the model's input.

    Undo ImageNet normalization, convert to grayscale (ITU-R 601 luma, as PIL's ``L``) when the
    model takes one channel, resize to the model's size (bilinear, antialiased) and normalize
    with the model's mean/std; then run the model.
    """

    def __init__(self, model: nn.Module, spec: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.size = int(spec["input_size"])
        self.gray = int(spec["channels"]) == 1
        c = int(spec["channels"])
        self.register_buffer("in_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("in_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.register_buffer("luma", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1))
        self.register_buffer("mean", torch.tensor(spec["mean"], dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(spec["std"], dtype=torch.float32).view(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.in_std + self.in_mean
        if self.gray:
            x = (x * self.luma).sum(dim=1, keepdim=True)
        x = F.interpolate(x, size=[self.size, self.size], mode="bilinear", align_corners=False,
                          antialias=True)
        return self.model((x - self.mean) / self.std)


def build_stock_archive(scripted_path: Path, spec: dict[str, Any], out_dir: Path,
                        model_config: dict[str, Any], work: Path, name: str = STOCK_NAME) -> Path:
    """``<name>.mar``: the wrapped TorchScript model with ``--handler image_classifier``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inner = torch.jit.load(str(scripted_path)).eval()
        wrapped = torch.jit.freeze(torch.jit.script(StockInputAdapter(inner, spec).eval()))
        path = work / "stock_model.pt"
        torch.jit.save(wrapped, str(path))
    with torch.inference_mode():
        out = wrapped(torch.zeros(2, 3, 224, 224))
    assert tuple(out.shape) == (2, len(spec["labels"])), out.shape
    cfg = {k: v for k, v in model_config.items() if k != "handler"}
    return run_archiver(name, path, "image_classifier", list(spec["labels"]), cfg, out_dir)


# --- inputs ----------------------------------------------------------------------------------
def crop_payloads() -> list[bytes]:
    """The fixture face crops (FER2013 48x48), re-encoded as 3-channel JPEGs (quality 95)."""
    out = []
    for p in sorted((FIXTURES / "faces").glob("*/*.jpg")):
        buf = io.BytesIO()
        Image.open(p).convert("RGB").save(buf, "JPEG", quality=95)
        out.append(buf.getvalue())
    if not out:
        raise SystemExit("no face crops under tests/fixtures/faces")
    return out


def photo_payloads(limit: int) -> tuple[list[bytes], str]:
    """Real photos with faces: the shared news photos when present, else the fixtures."""
    shared = SHARED / "photos" / "images"
    files = sorted(shared.glob("*.jpg"))[:limit] if shared.is_dir() else []
    source = str(shared)
    if not files:
        files = sorted((FIXTURES / "photos").glob("*.jpg")) + sorted((FIXTURES / "colour").glob("*.jpg"))
        source = "tests/fixtures/photos + colour"
    return [p.read_bytes() for p in files], f"{source} ({len(files)} files)"


def video_clip(work: Path) -> tuple[bytes, str]:
    """A 4-second 256x256 H.264 clip: cut from a MEAD clip (looped if shorter), else encoded
    from the fixture clip."""
    import av

    candidates = sorted((SHARED / "videos" / "labelled").glob("*.mp4"))
    src = candidates[0] if candidates else FIXTURES / "video" / "mead_happy_1s_128.mp4"
    frames, fps = [], 25.0
    with av.open(str(src)) as c:
        stream = c.streams.video[0]
        fps = float(stream.average_rate or 25)
        for frame in c.decode(video=0):
            frames.append(frame.to_image().convert("RGB").resize((256, 256), Image.BILINEAR))
    want = int(round(CLIP_SECONDS * fps))
    frames = (frames * (want // max(len(frames), 1) + 1))[:want]  # loop when shorter
    path = work / "clip_4s_256.mp4"
    with av.open(str(path), "w") as out:
        s = out.add_stream("h264", rate=int(round(fps)))
        s.width, s.height, s.pix_fmt = 256, 256, "yuv420p"
        for img in frames:
            for pkt in s.encode(av.VideoFrame.from_image(img)):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    return path.read_bytes(), f"{src.name}, first {CLIP_SECONDS:.0f}s at {fps:.0f} fps, 256x256"


def street_clip() -> tuple[bytes, str] | None:
    """The first 4 s of the 1080p five-face street clip, re-encoded as H.264 (None without ../shared/data)."""
    src = SHARED / "videos" / "unlabelled" / "facenet_pytorch_video.mp4"
    if not src.is_file():
        return None
    return cut(src, CLIP_SECONDS), f"{src.name}, first {CLIP_SECONDS:.0f}s, 1920x1080, five faces"


# --- in-process figures ----------------------------------------------------------------------
def inprocess_limit(scripted_path: Path, spec: dict[str, Any], batches: Sequence[int],
                    seconds: float, thread_counts: Sequence[int]) -> dict[str, Any]:
    """Best items/s over batch sizes, thread counts and graphs (plain TorchScript and the
    handlers' default CPU graph, ``handlers/cpu_graph.py``), and the best batch-1 latency: the
    most the model can do."""
    from handlers.cpu_graph import optimize_for_cpu

    c, s = int(spec["channels"]), int(spec["input_size"])
    load = lambda: load_scripted(scripted_path)[0]  # noqa: E731
    fast, mode = optimize_for_cpu(load(), torch.randn(2, c, s, s), load, IMAGE_DEFAULTS["optimize"])
    graphs = {"plain": load(), mode: fast}
    out: dict[str, Any] = {"per_config": {}}
    best, b1 = (0.0, 0, "", 0), float("inf")
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for gname, model in graphs.items():
            for b in batches:
                med = statistics.median(time_batches(model, torch.randn(b, c, s, s), seconds))
                ips = b / med
                out["per_config"][f"{gname}_t{threads}_b{b}"] = round(ips, 1)
                if b == 1:
                    b1 = min(b1, med * 1000)
                if ips > best[0]:
                    best = (ips, b, gname, threads)
    out.update(items_per_s=round(best[0], 1), best_batch=best[1], best_graph=best[2],
               best_threads=best[3], b1_ms=round(b1, 3))
    return out


def video_model_ms(scripted_path: Path, spec: dict[str, Any], n_clips: int, threads: int,
                   reps: int) -> float:
    """Median ms of one forward pass over ``n_clips`` model inputs (clips, or a per-frame
    model's face crops), the handler's CPU graph."""
    from handlers.cpu_graph import optimize_for_cpu

    torch.set_num_threads(threads)
    shape = tuple(int(v) for v in spec["extra"]["input_shape"])
    load = lambda: load_scripted(scripted_path)[0]  # noqa: E731
    model, _ = optimize_for_cpu(load(), torch.randn(2, *shape), load, VIDEO_DEFAULTS["optimize"])
    x = torch.randn(n_clips, *shape)
    with torch.inference_mode():
        model(x)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


# --- orchestration ---------------------------------------------------------------------------
def weights(path: Path, arch: str, work: Path, allow_random: bool, what: str) -> tuple[Path | None, str]:
    if path.is_file():
        return path, str(path)
    if not allow_random:
        return None, "absent"
    torch.manual_seed(0)
    rnd = work / f"random_{arch}.pth"
    save_weights(create_model(arch), rnd)
    log.warning("%s weights %s absent: using random-init %s (speed does not depend on weights)",
                what, path, arch)
    return rnd, f"random-init {arch}"


def process_cpu_s(server_pid: int | None) -> dict[str, float]:
    """CPU seconds used so far by the TorchServe frontend, its workers (all models) and this
    process (the load client)."""
    import psutil

    out = {"frontend": 0.0, "workers": 0.0, "client": 0.0}
    procs: list[tuple[str, Any]] = [("client", psutil.Process())]
    if server_pid:
        try:
            front = psutil.Process(server_pid)
            procs += [("frontend", front)] + [("workers", p) for p in front.children(recursive=True)]
        except psutil.Error:
            pass
    for key, proc in procs:
        try:
            t = proc.cpu_times()
            out[key] += t.user + t.system
        except psutil.Error:  # a worker that exited meanwhile
            pass
    return out


def scrape_custom_metrics(metrics_url: str) -> list[str]:
    """The ``emotion_*`` lines of the Prometheus endpoint (empty unless metrics_mode=prometheus)."""
    import requests

    try:
        text = requests.get(f"{metrics_url}/metrics", timeout=10).text
    except requests.RequestException as e:
        return [f"unavailable: {e}"]
    return [line for line in text.splitlines() if line.startswith("emotion_")]


def table(rows: list[LoadResult]) -> str:
    lines = ["| scenario | concurrency | requests ok/sent | req/s | p50 ms | p90 ms | p99 ms "
             "| CPU ms/request: frontend / workers / client |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cpu = r.extra.get("cpu_ms_per_request")
        split = f"{cpu['frontend']:.2f} / {cpu['workers']:.2f} / {cpu['client']:.2f}" if cpu else ""
        lines.append(f"| {r.name} | {r.concurrency} | {r.ok}/{r.sent} | {r.rps:.1f} | "
                     f"{r.p50_ms:.1f} | {r.p90_ms:.1f} | {r.p99_ms:.1f} | {split} |")
    return "\n".join(lines)


def plot(rows: list[LoadResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    names = sorted({r.name for r in rows})
    for name in names:
        pts = sorted((r.concurrency, r.rps, r.p99_ms) for r in rows if r.name == name and r.ok)
        if not pts:
            continue
        xs = [p[0] for p in pts]
        a1.plot(xs, [p[1] for p in pts], marker="o", label=name)
        a2.plot(xs, [p[2] for p in pts], marker="o", label=name)
    for ax, ylabel in ((a1, "requests/s"), (a2, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    a2.set_yscale("log")
    a1.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serve_bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: few requests, short limits")
    p.add_argument("--image-weights", type=Path, default=REPO / "pretrain" / "emotion_image.pth")
    p.add_argument("--video-weights", type=Path, default=REPO / "pretrain" / "emotion_video.pth")
    p.add_argument("--allow-random", action="store_true",
                   help="use random-init weights where pretrain/*.pth is absent (video is skipped "
                        "otherwise; the image model always falls back, its speed is weight-free)")
    p.add_argument("--no-video", action="store_true")
    p.add_argument("--no-stock", action="store_true")
    p.add_argument("--batch-size", type=int, help="image archive batchSize (default: export TASKS)")
    p.add_argument("--max-batch-delay", type=int, help="image archive maxBatchDelay, ms")
    p.add_argument("--workers", type=int, help="image archive workers")
    p.add_argument("--worker-threads", type=int, help="torch threads per image worker (0 = cores/workers)")
    p.add_argument("--threads", default=",".join(sorted({"1", str(os.cpu_count() or 1)})),
                   help="torch thread counts tried for the in-process limit (the best counts)")
    p.add_argument("--concurrency", default="1,8,32", help="REST crop concurrency levels")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--ts-config", type=Path, default=REPO / "config.properties",
                   help="TorchServe config to serve with")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    args = parse_args(argv)
    q = args.quick
    levels = [int(c) for c in args.concurrency.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]
    cpus = os.cpu_count() or 1
    # bounded by count and time: crops run for about the time limit at any realistic rate
    n_crops, t_crops = (5000, 6.0) if q else (20000, 15.0)
    n_photos, t_photos = (40, 10.0) if q else (400, 15.0)
    n_video = {1: 2, 4: 4} if q else {1: 4, 4: 8}
    t_video = 40.0 if q else 60.0
    limit_s = 0.5 if q else 2.0
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    t_start = time.monotonic()
    result: dict[str, Any] = {
        "mode": "quick" if q else "full", "started": stamp,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "cuda": torch.cuda.is_available(),
                    "loadavg_start": os.getloadavg()}}
    rows: list[LoadResult] = []
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        work = Path(tmp)
        store = work / "model_store"
        store.mkdir()
        # 1. archives, built from one TorchScript export
        img_w, result["image_weights"] = weights(args.image_weights, "emo_resnet_s", work, True, "image")
        model = load_model(img_w)
        spec = model.spec.to_dict()
        ts_img = export_torchscript(model, spec, work / "image_model.pt")
        overrides = {k: v for k, v in {"batchSize": args.batch_size, "maxBatchDelay": args.max_batch_delay,
                                       "minWorkers": args.workers, "maxWorkers": args.workers}.items()
                     if v is not None}
        handler_over = {"threads": args.worker_threads} if args.worker_threads is not None else {}
        cfg = model_config_for("image", overrides, handler_over)
        result["image_archive"] = cfg
        build_archive("image", ts_img, spec, store, model_config=cfg)
        models = ["emotion_image=emotion_image.mar"]
        # the stock handler with the same settings, and with one worker: it leaves PyTorch's
        # default threads (all cores) per worker, so several workers oversubscribe the cores
        stocks: dict[str, str] = {}
        if not args.no_stock:
            stocks[STOCK_NAME] = f"stock handler ({cfg['maxWorkers']} workers), crops REST"
            build_stock_archive(ts_img, spec, store, cfg, work)
            if int(cfg["maxWorkers"]) != 1:
                one = {**cfg, "minWorkers": 1, "maxWorkers": 1}
                stocks[f"{STOCK_NAME}_1w"] = "stock handler (1 worker), crops REST"
                build_stock_archive(ts_img, spec, store, one, work, f"{STOCK_NAME}_1w")
            models += [f"{n}={n}.mar" for n in stocks]
        result["stock_variants"] = stocks
        vid_w, result["video_weights"] = (None, "skipped (--no-video)") if args.no_video else \
            weights(args.video_weights, "emo_video_frames", work, args.allow_random, "video")
        ts_vid = vspec = None
        if vid_w is None:
            print(f"video: skipped ({result['video_weights']}: {args.video_weights} missing; "
                  f"pass --allow-random to use random-init weights)", file=sys.stderr)
        else:
            vmodel = load_model(vid_w)
            vspec = vmodel.spec.to_dict()
            ts_vid = export_torchscript(vmodel, vspec, work / "video_model.pt")
            build_archive("video", ts_vid, vspec, store, model_config=model_config_for("video"))
            clip, result["video_clip"] = video_clip(work)
            street = street_clip()
            video_loads = [("video REST (4 s 256x256 clip)", clip)]
            if street is not None:
                video_loads.append(("video REST (4 s 1080p clip, 5 faces)", street[0]))
                result["video_street_clip"] = street[1]

        # 2. the limit, before serving
        limit_before = inprocess_limit(ts_img, spec, (1, 8, 32, 64), limit_s, thread_counts)
        log.info("in-process limit (before): %s items/s", limit_before["items_per_s"])

        crops = crop_payloads()
        photos, result["photos"] = photo_payloads(64 if q else 200)
        result["crops"] = f"tests/fixtures/faces ({len(crops)} FER2013 crops, re-encoded RGB JPEG q95)"
        with machine_lock():  # one lock for both servers: no other TorchServe user in between
            with serving(store, models, work / "server", args.ts_config, 300) as ts:
                auth = ts.auth("inference")
                url = ts.predictions_url("emotion_image")
                # the stock handler on the original 1-channel JPEG
                if not args.no_stock:
                    gray = next(iter(sorted((FIXTURES / "faces").glob("*/*.jpg")))).read_bytes()
                    probe = RestClient(ts.predictions_url(STOCK_NAME), auth)
                    result["stock_accepts_grayscale_jpeg"] = probe(gray)
                    probe.close()
                    check = RestClient(ts.predictions_url(STOCK_NAME), auth)
                    assert check(crops[0]), f"stock handler failed: {check.last_error}"
                    result["stock_sample_answer"] = json.loads(check.last_body)
                    check.close()
                check = RestClient(url, auth)
                assert check(crops[0]), f"emotion_image failed: {check.last_error}"
                result["image_sample_answer"] = json.loads(check.last_body)
                check.close()

                def rest(name: str, model_name: str, payloads: list[bytes], conc: int, n: int, t: float) -> LoadResult:
                    u = ts.predictions_url(model_name)
                    before = process_cpu_s(ts.pid)
                    r = run_load(lambda: RestClient(u, auth), payloads, conc, n, t, name=name)
                    after = process_cpu_s(ts.pid)  # workers of every model: only this one is busy
                    r.extra["cpu_ms_per_request"] = {k: round(1000 * (after[k] - before[k]) / max(r.ok, 1), 3)
                                                     for k in after}
                    log.info("%s c=%d: %.1f req/s, p50 %.1f ms, p99 %.1f ms, %d errors %s", name, conc,
                             r.rps, r.p50_ms, r.p99_ms, r.errors, r.first_error)
                    rows.append(r)
                    return r

                # interleave ours and stock per level, so that both see the same background load
                for conc in levels:
                    rest("crops REST", "emotion_image", crops, conc, n_crops, t_crops)
                    for stock_model, stock_row in stocks.items():
                        rest(stock_row, stock_model, crops, conc, n_crops, t_crops)
                token = ts.keys["inference"]
                g = run_load(lambda: GrpcClient(ts.grpc_inference, "emotion_image", token), crops, 8,
                             n_crops, t_crops, name="crops gRPC")
                rows.append(g)
                for conc in (1, 8):
                    rest("photos REST (detection)", "emotion_image", photos, conc, n_photos, t_photos)
                result["custom_metrics"] = scrape_custom_metrics(ts.metrics_url)
            # video in a server of its own: a video archive that fails to load costs only its part
            if ts_vid is not None:
                try:
                    with serving(store, ["emotion_video=emotion_video.mar"], work / "server-video",
                                 args.ts_config, 300) as ts:
                        auth = ts.auth("inference")
                        check = RestClient(ts.predictions_url("emotion_video"), auth)
                        assert check(clip), f"emotion_video failed: {check.last_error}"
                        answer = json.loads(check.last_body)
                        check.close()
                        result["video_sample_answer"] = answer
                        for name, body in video_loads:
                            for conc in (1, 4):
                                r = run_load(lambda: RestClient(ts.predictions_url("emotion_video"), auth), [body],
                                             conc, n_video[conc], t_video, name=name,
                                             warmup=1 if conc == 1 else 0)  # the c=1 run warmed the worker
                                log.info("%s c=%d: %.2f clips/s, p50 %.0f ms, p99 %.0f ms", name, conc, r.rps,
                                         r.p50_ms, r.p99_ms)
                                rows.append(r)
                except Exception as e:  # reported, and the image figures still count
                    log.error("video part failed: %s", e)
                    result["video_error"] = str(e)[-3000:]
                    ts_vid = None
        # 3. the limit again, after serving (the higher is used: ratios err low)
        limit_after = inprocess_limit(ts_img, spec, (1, 8, 32, 64), limit_s, thread_counts)
        limit = max(limit_before, limit_after, key=lambda d: d["items_per_s"])
        result["limit"] = {"before": limit_before, "after": limit_after,
                           "items_per_s": limit["items_per_s"], "b1_ms": limit["b1_ms"],
                           "best_batch": limit["best_batch"], "best_graph": limit["best_graph"],
                           "best_threads": limit["best_threads"]}
        if ts_vid is not None:
            answer = result["video_sample_answer"]
            if (vspec.get("extra") or {}).get("frame_model"):  # one input per face crop
                n_clips = answer["faces"]["sampled_frames"] + sum(p["found_frames"] for p in answer.get("people", [])[1:])
            else:
                n_clips = 1 + len(answer.get("timeline", []))
            v1 = next(r for r in rows if r.name.startswith("video") and r.concurrency == 1)
            threads = cpus // max(1, int(model_config_for("video").get("maxWorkers", 1)))
            ms = video_model_ms(ts_vid, vspec, n_clips, max(1, threads), 3 if q else 10)
            result["video"] = {"clips_per_request": n_clips, "model_ms_per_request": round(ms, 1),
                               "model_share_of_p50": round(ms / v1.p50_ms, 3) if v1.ok else None}

    by = {(r.name, r.concurrency): r for r in rows}
    top = max(levels)
    ours = by.get(("crops REST", top))
    stock_rows = [by[(name, top)] for name in result["stock_variants"].values() if (name, top) in by]
    stock = max(stock_rows, key=lambda r: r.rps) if stock_rows else None
    same = by.get((result["stock_variants"].get(STOCK_NAME, ""), top))
    figures: dict[str, Any] = {
        "limit_items_per_s": result["limit"]["items_per_s"], "limit_b1_ms": result["limit"]["b1_ms"],
        "image_vs_inprocess": round(ours.rps / result["limit"]["items_per_s"], 3) if ours else None,
        # against the stock handler's best variant (same settings, or one worker)
        "image_vs_stock_handler": round(ours.rps / stock.rps, 3) if ours and stock and stock.rps else None,
        "image_vs_stock_same_settings": round(ours.rps / same.rps, 3) if ours and same and same.rps else None,
    }
    for r in rows:
        # "stock handler (1 worker), crops REST" -> "stock_handler_1_worker_crops_rest"
        key = re.sub(r"[^a-z0-9]+", "_", r.name.lower()).strip("_")
        figures[f"{key}_c{r.concurrency}_rps"] = r.rps
        figures[f"{key}_c{r.concurrency}_p50_ms"] = r.p50_ms
        figures[f"{key}_c{r.concurrency}_p90_ms"] = r.p90_ms
        figures[f"{key}_c{r.concurrency}_p99_ms"] = r.p99_ms
    if "video" in result:
        figures["video_model_share_of_p50"] = result["video"]["model_share_of_p50"]
    result["figures"] = figures
    result["runs"] = [r.to_dict() for r in rows]
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["elapsed_s"] = round(time.monotonic() - t_start, 1)

    json_path = args.out / f"serve_bench-{stamp}.json"
    json_path.write_text(json.dumps(result, indent=1))
    (args.out / "serve_bench-latest.json").write_text(json.dumps(result, indent=1))
    title = (f"{result['mode']} run {stamp}, {os.cpu_count()} CPUs, archive batch "
             f"{result['image_archive']['batchSize']}/{result['image_archive']['maxBatchDelay']} ms, "
             f"{result['image_archive']['maxWorkers']} worker(s)")
    plot(rows, args.out / f"serve_bench-{stamp}.png", title)
    print(f"\n## Served vs in-process ({title})\n")
    print(f"In-process limit: {result['limit']['items_per_s']:.0f} crops/s (batch "
          f"{result['limit']['best_batch']}, {result['limit']['best_graph']} graph, "
          f"{result['limit']['best_threads']} thread(s)); batch-1 latency {result['limit']['b1_ms']:.2f} ms\n")
    print(table(rows))
    if "video" in result:
        v = result["video"]
        print(f"\nVideo: {v['clips_per_request']} model inputs per 4 s 256x256 request, model forward "
              f"{v['model_ms_per_request']:.0f} ms = {v['model_share_of_p50']} of p50 at concurrency 1")
    print(f"\nimage_vs_inprocess = {figures['image_vs_inprocess']} (target >= 0.70), "
          f"image_vs_stock_handler = {figures['image_vs_stock_handler']} (target >= 1.3)")
    print(f"results: {json_path} and .png; elapsed {result['elapsed_s']:.0f} s")
    print(json.dumps({**figures, "mode": result["mode"], "elapsed_s": result["elapsed_s"],
                      "cpus": os.cpu_count(), "loadavg_start": result["machine"]["loadavg_start"][0],
                      "image_weights": result["image_weights"], "video_weights": result["video_weights"],
                      "stock_accepts_grayscale_jpeg": result.get("stock_accepts_grayscale_jpeg")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
