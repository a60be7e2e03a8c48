"""A live stream to the ``emotion_live`` model over gRPC ``StreamPredictions2``, one frame in flight.

    .venv/bin/python -m serving.live --source 0                 # the first webcam (/dev/video0)
    .venv/bin/python -m serving.live --source clip.mp4 --csv clip_live.csv
    .venv/bin/python -m serving.live --source rtsp://camera/stream --fps 5

Frames are taken at ``--fps`` (in the source's own time), scaled to at most ``--max-side`` pixels,
sent as JPEG with their time over one bidirectional stream, one at a time: from a camera or a
network stream the newest frame goes next and the ones that arrived meanwhile are dropped, never
queued; a file is read frame by frame (as fast as the service answers, or at its own pace with
``--realtime``). Each person's smoothed label is printed when it changes, a progress line shows the
rate and latency, and ``--csv`` gets a row per person per frame: time, frame, person, label and the
seven smoothed probabilities (and this frame's own top label). The sequence is closed at the end.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import queue
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, TextIO

from PIL import Image

from handlers.contract import LIVE_SEQUENCE_END_HEADER

from .grpc_client import load_stubs

END_INPUT = LIVE_SEQUENCE_END_HEADER
"""The input that closes a sequence after its frame (TorchServe's header name, sent as an input)."""


def is_device(source: str) -> bool:
    """A camera index (``0``) or a V4L2 device path."""
    return source.isdigit() or source.startswith("/dev/video")


def open_source(source: str) -> Any:
    """The PyAV container of a file, a URL (RTSP over TCP) or a camera (``0`` = /dev/video0)."""
    import av  # here, not at the top: only reading video needs it

    if is_device(source):
        return av.open(f"/dev/video{source}" if source.isdigit() else source, format="v4l2")
    options = {"rtsp_transport": "tcp"} if source.startswith("rtsp") else {}
    return av.open(source, options=options)


def file_frames(container: Any, fps: float) -> Iterator[tuple[float, Image.Image]]:
    """``(time s, frame)`` of a file at ``fps`` in its own time (the frames between are skipped)."""
    stream = container.streams.video[0]
    next_t, first = 0.0, None
    for frame in container.decode(stream):
        t = float(frame.time) if frame.time is not None else 0.0
        first = t if first is None else first
        t -= first
        if t + 1e-6 >= next_t:
            while next_t <= t + 1e-6:  # on the grid of 1 / fps, whatever the source's rate
                next_t += 1.0 / fps
            yield t, frame.to_image()


FULL_HINT = "If this is a sequence inference"
"""In TorchServe 0.12's 503 for a sequence it cannot take (more than ``maxNumSequence``, a closed one)."""


class LatestFrame:
    """Reads a camera or network stream in a thread and keeps only its newest frame at ``fps``."""

    def __init__(self, container: Any, fps: float) -> None:
        self.frames = file_frames(container, fps)
        self.latest: tuple[float, Image.Image] | None = None
        self.done = False
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for item in self.frames:
                with self.cond:
                    self.latest = item
                    self.cond.notify()
        finally:
            with self.cond:
                self.done = True
                self.cond.notify()

    def __iter__(self) -> Iterator[tuple[float, Image.Image]]:
        while True:
            with self.cond:
                while self.latest is None and not self.done:
                    self.cond.wait()
                if self.latest is None:
                    return
                item, self.latest = self.latest, None
            yield item


def jpeg(img: Image.Image, max_side: int, quality: int = 85) -> bytes:
    """``img`` as JPEG with its longer side at most ``max_side``."""
    img = img.convert("RGB")
    scale = min(1.0, max_side / max(img.size))
    if scale < 1.0:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


class LiveStream:
    """One sequence over one ``StreamPredictions2`` call: :meth:`send` a frame, get its answer."""

    def __init__(self, target: str, model: str, token: str | None, sequence_id: str | None = None,
                 timeout: float = 60.0) -> None:
        import grpc  # here, not at the top: only gRPC calls need it

        self.stubs = load_stubs()
        self.model = model
        self.sequence_id = sequence_id or f"live-{uuid.uuid4().hex}"
        self.timeout = timeout
        self.channel = grpc.insecure_channel(target)
        stub = self.stubs["inference_pb2_grpc"].InferenceAPIsServiceStub(self.channel)
        self.requests: queue.Queue = queue.Queue()
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.responses = stub.StreamPredictions2(iter(self.requests.get, None), metadata=metadata)

    def send(self, frame: bytes | None, t: float | None = None, end: bool = False) -> dict[str, Any]:
        """Send one frame (with its time in seconds; ``end`` closes the sequence after it; no
        frame with ``end`` only closes it) and wait for its answer (an error is JSON too)."""
        inputs: dict[str, bytes] = {}
        if frame is not None:
            inputs["data"] = frame
        if t is not None:
            inputs["time"] = f"{t:.4f}".encode()
        if end:
            inputs[END_INPUT] = b"true"
        self.requests.put(self.stubs["inference_pb2"].PredictionsRequest(
            model_name=self.model, input=inputs, sequence_id=self.sequence_id))
        response = next(self.responses)
        return json.loads(response.prediction) if response.prediction else {"message": response.status.message}

    def close(self) -> None:
        """End the call (the sequence itself is closed by a request with ``end``)."""
        self.requests.put(None)
        self.channel.close()


class Report:
    """Prints label changes and a progress line; writes the CSV rows."""

    def __init__(self, out: TextIO, csv_file: TextIO | None, progress: bool) -> None:
        self.out, self.progress = out, progress
        self.writer = csv.writer(csv_file) if csv_file else None
        self.labels: dict[int, str] = {}
        self.latencies: list[float] = []
        self.started: float | None = None  # when the first answer came
        self.frames = 0
        self.header = False

    def add(self, t: float, answer: dict[str, Any], latency: float) -> bool:
        """Report one answer; False when the stream cannot go on (no room for it)."""
        self.started = self.started or time.monotonic()
        self.frames += 1
        self.latencies.append(latency)
        if "people" not in answer:
            message = str(answer.get("message", answer))
            full = FULL_HINT in message  # TorchServe's own words for one sequence more than maxNumSequence
            if full:
                message += " (the live model follows as many streams as it may: try again when one ends)"
            print(f"\n{t:7.2f} s  error: {answer.get('code', '')} {message}", file=self.out)
            return not full
        for p in answer["people"]:
            top = p["top3"][0]
            if self.labels.get(p["id"]) != top["label"]:
                self.labels[p["id"]] = top["label"]
                print(f"{'' if not self.progress else chr(13)}{t:7.2f} s  person {p['id']}: {top['label']} "
                      f"{top['probability']:.2f}" + " " * 30, file=self.out)
            self._row(t, answer["frame"], p)
        if self.progress:
            rate = (self.frames - 1) / max(time.monotonic() - self.started, 1e-9)
            ms = 1000 * statistics.median(self.latencies[-50:])
            people = " ".join(f"{i}:{lab}" for i, lab in sorted(self.labels.items()) if
                              any(p["id"] == i for p in answer["people"]))
            print(f"\rframe {answer['frame']} · {t:.1f} s · {rate:.1f} frames/s · {ms:.0f} ms · {people}   ",
                  end="", file=sys.stderr, flush=True)
        return True

    def _row(self, t: float, frame: int, p: dict[str, Any]) -> None:
        if self.writer is None:
            return
        labels = list(p["probabilities"])
        if not self.header:
            self.writer.writerow(["time", "frame", "person", "label", *labels, "frame_label"])
            self.header = True
        self.writer.writerow([f"{t:.3f}", frame, p["id"], p["top3"][0]["label"],
                              *(f"{p['probabilities'][k]:.4f}" for k in labels), p["frame_top3"][0]["label"]])


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Stream ``args.source`` to the live model (see module docstring); prints to ``out`` (stdout)."""
    out = out or sys.stdout
    token = json.loads(args.key_file.read_text())["inference"]["key"] if args.key_file.is_file() else None
    container = open_source(args.source)
    live = is_device(args.source) or "://" in args.source
    frames = LatestFrame(container, args.fps) if live else file_frames(container, args.fps)
    stream = LiveStream(args.target, args.model, token)
    csv_file = open(args.csv, "w", newline="") if args.csv else None
    report = Report(out, csv_file, progress=not args.quiet)
    t0 = time.monotonic()
    going = True
    try:
        for n, (t, img) in enumerate(frames):
            if args.realtime and not live:
                time.sleep(max(0.0, t - (time.monotonic() - t0)))
            sent = time.monotonic()
            answer = stream.send(jpeg(img, args.max_side), t)
            going = report.add(t, answer, time.monotonic() - sent)
            if not going or (args.frames and n + 1 >= args.frames):
                break
        if going:
            stream.send(None, end=True)
    except KeyboardInterrupt:
        pass
    finally:
        stream.close()
        container.close()
        if csv_file:
            csv_file.close()
    if not args.quiet:
        print(file=sys.stderr)
    print(f"{report.frames} frames, sequence {stream.sequence_id}" + (f", CSV {args.csv}" if args.csv else ""),
          file=out)
    return 0 if going else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serving.live", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="0 (webcam index), a video file or an rtsp:// URL")
    p.add_argument("--model", default="emotion_live")
    p.add_argument("--target", default="127.0.0.1:7070", help="TorchServe's gRPC inference address")
    p.add_argument("--key-file", type=Path, default=Path("key_file.json"),
                   help="TorchServe's key_file.json (its inference key is sent)")
    p.add_argument("--fps", type=float, default=10.0, help="frames per second of the source to send")
    p.add_argument("--max-side", type=int, default=640, help="frames are scaled to at most this many pixels")
    p.add_argument("--realtime", action="store_true", help="send a file's frames at its own pace")
    p.add_argument("--frames", type=int, default=0, help="stop after this many frames (0: the whole source)")
    p.add_argument("--csv", type=Path, help="write time, frame, person, label and probabilities here")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
