"""Video explanations in process: how much each frame weighs in a clip's pooled answer, and the
clip model's 400 (its explanations are not offered)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ts.context import RequestProcessor

from handlers import explain, video_pool
from handlers.video_handler import EmotionVideoHandler
from model_defs import LABELS
from tests.handler_context import extracted_archive, make_context
from tests.test_video_handler import video_checkpoint

CLIP = Path(__file__).parent / "fixtures" / "video" / "mead_happy_1s_128.mp4"


def test_leave_one_out_weighs_frames_as_the_pooling_does():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(9, len(LABELS), generator=g), 1)
    k = LABELS.index("happy")
    mean = explain.leave_one_out(lambda p: video_pool.pool(p, LABELS, "mean"), probs, k)
    # without frame i the mean moves by (p_i - mean) / (T - 1)
    assert torch.allclose(mean, (probs[:, k] - probs[:, k].mean()) / 8, atol=1e-6)
    peak = explain.leave_one_out(lambda p: video_pool.pool(p, LABELS, "peak"), probs, k)
    # peak pools the ceil(0.4 T) least neutral frames (4 of 9, and of 8): only those weigh
    chosen = set((1 - probs[:, LABELS.index("neutral")]).topk(4).indices.tolist())
    assert all(peak[i] == 0 for i in range(9) if i not in chosen) and all(peak[i] != 0 for i in chosen)
    assert explain.leave_one_out(lambda p: p.mean(0), probs[:1], k).tolist() == [0.0]


def test_a_clip_model_answers_400_to_explanations(tmp_path):
    model_dir = extracted_archive("video", video_checkpoint(tmp_path / "hybrid.pth"), tmp_path)
    h = EmotionVideoHandler()
    h.initialize(make_context(model_dir, 1))
    ctx = make_context(model_dir, 2)
    ctx.request_processor = [RequestProcessor({}), RequestProcessor({"explain": "True"})]
    out = h.handle([{"body": CLIP.read_bytes()}] * 2, ctx)
    assert [ctx.get_response_status(i)[0] for i in range(2)] == [200, 400]
    assert "top3" in out[0] and "explanations are offered for per-frame video models only" in out[1]["message"]
