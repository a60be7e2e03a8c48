"""The demo page's webcam stream to the live model: ``POST /live`` on the demo server.

Each browser tab is one live sequence: the page names it (header ``X-Live-Sequence``, a random id
per tab) and the relay forwards each frame to TorchServe's ``/predictions/emotion_live`` with the
id in TorchServe's sequence header (``contract.LIVE_SEQUENCE_HEADER``) and the inference key.
``X-Live-End: 1`` closes the sequence (``contract.LIVE_SEQUENCE_END_HEADER``).

Per tab the relay holds one frame in flight and at most :data:`MAX_FPS` frames a second: a frame
sent while the tab's previous one is still being answered, or sooner than ``1 / MAX_FPS`` after
it, gets 429 with a JSON message (the page drops frames rather than queueing them, so it never
sees one); a frame over ``contract.LIVE_MAX_FRAME_BYTES`` gets 413. Tabs not heard from for
:data:`TAB_IDLE_S` are forgotten.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from handlers.contract import LIVE_MAX_FRAME_BYTES, LIVE_SEQUENCE_END_HEADER, LIVE_SEQUENCE_HEADER

LIVE_PATH = "/live"
SEQUENCE_HEADER = "X-Live-Sequence"
END_HEADER = "X-Live-End"
MAX_FPS = 15.0
"""Frames a second one tab may send (the page sends 10)."""
TAB_IDLE_S = 60.0
SEQUENCE_ID = re.compile(r"^[A-Za-z0-9-]{8,64}$")


@dataclass
class Tab:
    in_flight: bool = False
    last_frame: float = -1e9
    seen: float = field(default_factory=time.monotonic)


class TabLimiter:
    """Per tab: one frame in flight, at most ``max_fps`` frames a second."""

    def __init__(self, max_fps: float = MAX_FPS, clock: Callable[[], float] = time.monotonic) -> None:
        self.min_gap = 1.0 / max_fps
        self.max_fps = max_fps
        self.clock = clock
        self.tabs: dict[str, Tab] = {}
        self.lock = threading.Lock()

    def admit(self, seq: str) -> str | None:
        """Take a frame of ``seq`` in (None) or say why not (the 429 message)."""
        now = self.clock()
        with self.lock:
            for old in [s for s, t in self.tabs.items() if now - t.seen > TAB_IDLE_S and not t.in_flight]:
                del self.tabs[old]
            tab = self.tabs.setdefault(seq, Tab(seen=now))
            if tab.in_flight:
                return "one frame at a time per tab: this tab's previous frame is still being answered"
            if now - tab.last_frame < self.min_gap:
                return f"at most {self.max_fps:g} frames a second per tab"
            tab.in_flight, tab.last_frame, tab.seen = True, now, now
            return None

    def done(self, seq: str) -> None:
        with self.lock:
            if seq in self.tabs:
                self.tabs[seq].in_flight = False


def check(headers, length: int) -> tuple[int, str, str] | None:
    """A request that cannot be relayed: ``(status, type, message)``; None when it can."""
    seq = headers.get(SEQUENCE_HEADER, "")
    if not SEQUENCE_ID.match(seq):
        return 400, "BadRequest", f"send the tab's sequence id (8-64 letters, digits, -) in {SEQUENCE_HEADER}"
    if length > LIVE_MAX_FRAME_BYTES:
        return 413, "RequestEntityTooLarge", f"frame of {length} bytes is over the {LIVE_MAX_FRAME_BYTES} byte limit"
    return None


def upstream_headers(headers) -> dict[str, str]:
    """The sequence headers TorchServe gets for a relayed frame."""
    out = {LIVE_SEQUENCE_HEADER: headers[SEQUENCE_HEADER]}
    if headers.get(END_HEADER) == "1":
        out[LIVE_SEQUENCE_END_HEADER] = "true"
    return out
