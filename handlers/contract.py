"""What the archive, the handlers and their callers agree on, in one place: plain constants.

The handlers read their options from the archive's ``model-config.yaml`` (``handler:``
section) over :data:`HANDLER_DEFAULTS`; ``export`` writes that section from the same
defaults, so a handler started without the YAML (a test, a benchmark) runs with the served
limits. No imports beyond the standard library: ``export``, ``model_defs`` and ``training``
may import this module, and inside a ``.mar`` it sits flat beside the handler.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Literal, Mapping, get_args

SPEC_FILE = "spec.json"
"""Name of the model's spec inside the TorchScript file (``torch.jit.save(_extra_files=...)``)."""

DetectionMode = Literal["auto", "always", "never"]
DETECTION_MODES: tuple[str, ...] = get_args(DetectionMode)
"""Face detection: ``auto`` (faces, or the whole image when it is a face crop or has none),
``always`` (faces only) and ``never`` (the whole image)."""

FaceDetectorName = Literal["retinaface", "mtcnn"]
FACE_DETECTORS: tuple[str, ...] = get_args(FaceDetectorName)
"""The handler option ``detector`` (``handlers/faces.py`` ``make_detector``): RetinaFace-MobileNet0.25,
one batched forward pass (the default, bench/README.md "Face detectors"), or MTCNN."""

CpuGraph = Literal["onednn", "mkldnn", "off"]
CPU_GRAPHS: tuple[str, ...] = get_args(CpuGraph)
"""The handler option ``optimize``, the graph a model runs on the CPU (``handlers/cpu_graph.py``):
oneDNN Graph fusion (the default), ``optimize_for_inference``'s MKLDNN graph, or the exported one."""

BATCH_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
"""With ``optimize: onednn``, the batch sizes a model is called at (batches are padded up to one,
larger ones are cut into chunks of 64): each is one compiled graph, all compiled at start-up.
The largest is also the explanations' chunk (``handlers/explain.py`` MAX_CHUNK)."""

MAX_IMAGE_PIXELS = 40_000_000
"""Largest image a request may send (413 above): a 7300x5500 photo, more than any phone sends."""

MAX_DETECT_SIDE = 1920
"""Photos are downscaled for face detection to this longer side: a 20 px face (the smallest
detected) in a 1920 px photo is 76 px in a 7300 px one."""

VIDEO_DETECT_MAX_SIDE = 640
"""Video frames are downscaled further for detection: detection on 48 sampled frames is most
of a clip's serving time and MTCNN's cost grows with the pixels (pretrain/MODEL_CARD.md)."""

MAX_REQUEST_BYTES = 64 * 1024 * 1024
"""config.properties' ``max_request_size``: TorchServe answers 413 itself above it."""

IMAGE_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "topk": 3,
    "threads": 0,  # 0: the usable cores (affinity, cgroup CPU limit) shared among maxWorkers workers
    "detection": "auto",
    "detector": FACE_DETECTORS[0],
    "min_face_size": 20,  # pixels, in the image as detection sees it
    "max_faces": 20,  # per image
    "detect_max_side": MAX_DETECT_SIDE,
    "max_pixels": MAX_IMAGE_PIXELS,
    "optimize": CPU_GRAPHS[0],  # the CPU graph (CPU_GRAPHS), kept only if it gives the plain model's output
    "half": True,  # float16 autocast on GPU, likewise
    # POST /explanations: the attribution method (handlers/explain.py METHODS; occlusion was the
    # most faithful and runs on the optimized graph, bench/bench_explain.py) and its map's cells per side
    "explain_method": "occlusion",
    "explain_grid": 16,
})
"""The image handler's options (``handlers/image_handler.py``)."""

VIDEO_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "topk": 3,
    "threads": 0,
    # limits on one video (handlers.video_decode.VideoLimits): 3,600 frames is 60 s at 60 fps
    "max_bytes": MAX_REQUEST_BYTES,
    "max_duration_s": 60.0,
    "max_frames": 3600,
    "max_pixels": 3840 * 2160,  # per frame (4K UHD)
    # H.264/HEVC in-loop deblocking: on, off (a fifth faster) or auto (off above 720p)
    "deblock": "auto",
    # timeline: windows of window_seconds every window_stride seconds, at most max_windows
    # (the stride grows for long videos)
    "window_seconds": 2.0,
    "window_stride": 2.0,
    "max_windows": 30,
    "detection": "auto",  # faces tracked through the video (the whole frame if it is one face crop)
    "detector": FACE_DETECTORS[0],
    "min_face_size": 20,  # pixels, in the frame as detection sees it (detect_max_side)
    "detect_max_side": VIDEO_DETECT_MAX_SIDE,
    # faces are detected on every keyframe_every-th sampled frame and tracked between keyframes;
    # up to `refine` rounds of detection half-way between keyframes that disagree
    # (handlers/video_track.py); at most max_people people per video get their own answer
    "keyframe_every": 6,  # sampled frames: 1 s at 6 frames/s; 4, 6 and 8 scored alike (MODEL_CARD.md)
    "refine": 1,
    "max_people": 8,
    "pooling": "",  # a per-frame model's pooling (handlers/video_pool.py); "": the spec's own
    "optimize": CPU_GRAPHS[0],
    # POST /explanations: per person, the explain_frames frames that weighed most in the clip's
    # answer, each with a map as the image handler's (explain_method, explain_grid)
    "explain_method": "occlusion",
    "explain_grid": 16,
    "explain_frames": 3,
})
"""The video handler's options (``handlers/video_handler.py``)."""

LIVE_SEQUENCES_PER_WORKER = 8
"""Live streams one worker of ``emotion_live`` holds at once: its TorchServe ``batchSize`` (the
frontend's sequence batching polls one job group per batch slot, so a worker serves at most this
many sequences) and the handler's own cap on the sequences it keeps state for."""

LIVE_SEQUENCE_IDLE_MS = 20_000
"""A live sequence that sends no frame for this long expires: TorchServe's ``sequenceMaxIdleMSec``
(it drops the sequence and frees its slot) and the handler's idle expiry of its state."""

LIVE_SEQUENCE_HEADER = "ts_request_sequence_id"
"""The REST request header carrying a live sequence id (TorchServe's default; over gRPC,
``StreamPredictions2``'s ``sequence_id`` field); TorchServe answers a new sequence's id in it."""

LIVE_SEQUENCE_END_HEADER = "ts_request_sequence_end"
"""The REST request header (over gRPC, the input) that closes a live sequence after its frame."""

LIVE_MAX_FRAME_BYTES = 4 * 1024 * 1024
"""Largest encoded frame a live request may send (413 above; the demo relay checks it too)."""

LIVE_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "topk": 3,
    "threads": 0,
    "max_bytes": LIVE_MAX_FRAME_BYTES,
    "max_pixels": 1920 * 1080,  # per frame (413 above)
    "detection": "auto",  # faces (the whole frame when it is a face crop already, or with "never")
    "detector": FACE_DETECTORS[0],
    "min_face_size": 20,  # pixels, in the frame as detection sees it (detect_max_side)
    "detect_max_side": VIDEO_DETECT_MAX_SIDE,  # a 640x480 camera frame is detected as it is
    # faces are detected on every keyframe_every-th frame of a sequence and their boxes carried
    # forward (constant velocity, handlers/video_track.py) in between
    "keyframe_every": 3,
    "lost_after": 2,  # keyframes in a row without a person's face before the person is dropped
    # the state bounds (handlers/live_state.py)
    "max_people": 8,  # persons tracked per sequence; more faces are not followed
    "max_history": 128,  # per-frame probabilities kept per person (12.8 s at 10 frames/s)
    "max_sequences": LIVE_SEQUENCES_PER_WORKER,  # sequences with state per worker
    "idle_seconds": LIVE_SEQUENCE_IDLE_MS / 1000,  # a sequence's state expires after this long idle
    # the smoothed answer: the video model's pooling (spec extra.pooling, handlers/video_pool.py)
    # over the person's frames of the last smooth_seconds, once there are min_frames of them
    # (the plain mean before that)
    "smooth_seconds": 4.0,
    "min_frames": 8,
    "pooling": "",  # "": the spec's own
    "optimize": CPU_GRAPHS[0],
})
"""The live handler's options (``handlers/live_handler.py``): one frame per request of a sequence."""

HANDLER_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {"image": IMAGE_DEFAULTS, "video": VIDEO_DEFAULTS, "live": LIVE_DEFAULTS})
"""Per task, the ``handler:`` section of its archive's ``model-config.yaml``."""

# --- Kubernetes / KServe (deploy/; the store built by ``python -m deploy.kserve_store``) ------
KSERVE_MODEL_ROOT = "/mnt/models"
"""Where KServe's storage initializer puts the store in the predictor pod (``config/``,
``model-store/``): the paths inside the store's ``config.properties`` start here."""

KSERVE_PREDICTOR_PORT = 8085
"""TorchServe's inference (and management) port behind KServe's model server in the same
container: the TorchServe KServe image's wrapper (``kserve_wrapper``) forwards to this port."""

KSERVE_HTTP_PORT = 8080
"""The port of KServe's model server, the pod's serving port (``/v1/models/<name>:predict``,
``/v2/models/<name>/infer``)."""

KSERVE_POD_CPUS = 2
"""CPUs per serving pod (deploy/ manifests' requests and limits): the 2 cores ``make bench``
measured and the archives' workers were tuned on. The store's archives get
``threads = KSERVE_POD_CPUS // maxWorkers``, the same figure the default (``threads: 0``, the
usable cores under the pod's cgroup CPU limit / maxWorkers, ``common.usable_cpus``) reaches in
such a pod, written out so that the archive says what it was tuned with."""

SERVICE_ENVELOPES: Mapping[str, str] = MappingProxyType({"v1": "kserve", "v2": "kservev2"})
"""TorchServe's ``service_envelope`` per KServe protocol version (``protocolVersion``)."""
